import pickle

import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import Adapter, LayerShape, ModelShape, TensorFormat
from slmsearch.hwmodel.shape import llama32_1b, smollm2_135m

CFG = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=48, vocab_size=100, tie_word_embeddings=True)


def test_reference_param_counts_match_anchors():
    # anchors.md section 4: 30 layers x 3.54M + tied embedding 49,152 x 576 (= 28.3M), 269 MB in fp16
    s = smollm2_135m()
    assert round(s.vocab_size * s.hidden / 1e6, 1) == 28.3
    assert round(s.n_params() / 1e6, 1) == 134.5
    assert round(s.n_params() * 2 / 1e6) == 269
    # Llama-3.2-1B: 16 x 60.8M + tied embedding 128,256 x 2,048 (= 262.7M)
    ll = llama32_1b()
    assert round(ll.vocab_size * ll.hidden / 1e6, 1) == 262.7
    assert round((ll.n_params() - ll.vocab_size * ll.hidden) / 16 / 1e6, 1) == 60.8


def test_transformations_and_their_errors():
    s = ModelShape.from_hf_config(CFG)
    assert s.drop_layers([0, 2]).n_layers == 1
    p = s.prune_structured(8, 1)
    assert (p.layers[0].intermediate, p.layers[0].n_kv_heads, p.layers[0].n_heads) == (40, 1, 2)
    with pytest.raises(SlmsearchError, match="0..2"):
        s.drop_layers([3])
    with pytest.raises(SlmsearchError, match="KV groups"):
        s.prune_structured(0, 2)
    with pytest.raises(SlmsearchError, match="density must be 0.5"):
        s.with_sparsity("2:4", 0.6)
    with pytest.raises(SlmsearchError, match="weight_bits"):
        TensorFormat(weight_bits=0)
    with pytest.raises(SlmsearchError, match="hidden_size"):
        ModelShape.from_hf_config({"num_hidden_layers": 2})
    assert s.with_sparsity("4:8").layers[0].sparsity.density == 0.5


def test_transforms_are_pure_and_compare_by_value():
    base = smollm2_135m()
    q4 = TensorFormat(weight_bits=4, group_size=128)
    a = base.drop_layers(range(3)).with_linear_format(q4)
    b = base.drop_layers([5, 9, 0]).with_linear_format(TensorFormat(weight_bits=4, group_size=128))
    assert a == b and a.n_layers == 27 and hash(a) == hash(b)
    assert base.n_layers == 30 and base.layers[0].linear_format == TensorFormat()  # the base is untouched
    assert all(layer.linear_format == q4 for layer in a.layers)
    assert pickle.loads(pickle.dumps(a)) == a
    assert a.to_dict()["layers"][0]["linear_format"]["weight_bits"] == 4


def test_drop_layers_keeps_the_order_of_the_others():
    base = smollm2_135m()
    pruned = LayerShape(6, 2, 64, 1024)
    odd = ModelShape(hidden=576, layers=base.layers[:3] + (pruned,) + base.layers[3:6], vocab_size=base.vocab_size)
    assert odd.drop_layers([3]).layers == base.layers[:6]
    assert odd.drop_layers([0, 1]).layers == (base.layers[2], pruned) + base.layers[3:6]
    assert odd.drop_layers([]) == odd
    assert odd.drop_layers(range(7)).n_layers == 0


def test_sparsity_adapter_and_precision_transforms():
    s = ModelShape.from_hf_config(CFG)
    sparse = s.with_sparsity("unstructured", 0.4)
    assert {(x.sparsity.format, x.sparsity.density) for x in sparse.layers} == {("unstructured", 0.4)}
    assert s.with_sparsity("2:4").layers[0].sparsity.density == 0.5
    adapted = s.with_adapter(8)
    assert {x.adapter for x in adapted.layers} == {Adapter(8, 16)}
    assert adapted.with_adapter(0).layers == s.layers
    emb = TensorFormat(weight_bits=4, zero_bits=0)
    untied = ModelShape(hidden=32, layers=s.layers, vocab_size=100, tie_word_embeddings=False,
                        lm_head_format=TensorFormat(8))
    assert untied.head_format == TensorFormat(8)
    assert untied.with_embedding_format(emb).head_format == emb  # a new embedding format replaces the head's
    assert s.with_kv_cache_bits(8).kv_cache_bits == 8 and s.with_activation_bits(8).activation_bits == 8
    with pytest.raises(SlmsearchError, match="kv_cache_bits"):
        s.with_kv_cache_bits(0)
    with pytest.raises(SlmsearchError, match="adapter rank"):
        s.with_adapter(-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_bits=33), "weight_bits"),
    (dict(weight_bits=4, group_size=0), "group_size"),
    (dict(scale_bits=-1), "scale_bits"),
    (dict(zero_bits=-2), "zero_bits"),
    (dict(g_idx_bits=1.5), "g_idx_bits"),
])
def test_tensor_format_rejects_bad_fields(kwargs, message):
    with pytest.raises(SlmsearchError, match=message):
        TensorFormat(**kwargs)


def test_layer_shape_rejects_bad_dimensions():
    with pytest.raises(SlmsearchError, match="n_heads must be a multiple of n_kv_heads"):
        LayerShape(n_heads=6, n_kv_heads=4, head_dim=8, intermediate=16)
    with pytest.raises(SlmsearchError, match="head_dim"):
        LayerShape(n_heads=4, n_kv_heads=2, head_dim=0, intermediate=16)
    with pytest.raises(SlmsearchError, match="unknown projection"):
        LayerShape(4, 2, 8, 16, proj_formats=(("qkv_proj", TensorFormat(8)),))
    layer = LayerShape(4, 2, 8, 16, linear_format=TensorFormat(4), proj_formats=(("down_proj", TensorFormat(8)),))
    assert layer.fmt("down_proj") == TensorFormat(8) and layer.fmt("q_proj") == TensorFormat(4)
