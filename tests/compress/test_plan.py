"""Plan: YAML/JSON round trips, rejection of unknown keys and bad values, canonical order, shape."""

from __future__ import annotations

import pytest

from slmsearch.compress.depth import DepthPrune
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.compress.gptq import Eora, Gptq
from slmsearch.compress.lora import LoraRecovery
from slmsearch.compress.plan import Plan
from slmsearch.compress.wanda import Wanda
from slmsearch.errors import SlmsearchError

FULL = Plan(
    (
        DepthPrune(drop=2),
        Wanda(sparsity=0.5),
        LoraRecovery(rank=8, steps=10),
        EmbeddingQuant(bits=8),
        Gptq(bits=4, group_size=64),
        Eora(rank=16),
    )
)


def test_round_trips():
    assert Plan.from_json(FULL.to_json()) == FULL
    assert Plan.from_yaml(FULL.to_yaml()) == FULL
    assert Plan.from_dict([{"stage": "wanda", "pattern": "2:4"}]) == Plan((Wanda(pattern="2:4"),))


def test_load_from_file(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("stages:\n  - {stage: depth, indices: [3, 4]}\n  - {stage: gptq, bits: 3, group_size: -1}\n")
    plan = Plan.load(path)
    assert plan.stages == (DepthPrune(indices=(3, 4)), Gptq(bits=3, group_size=-1))
    with pytest.raises(SlmsearchError, match="does not exist"):
        Plan.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "data,match",
    [
        ({"stages": [{"stage": "wanda", "sparsty": 0.5}]}, "no setting.*'sparsty'"),
        ({"stages": [{"stage": "prune"}]}, "unknown stage 'prune'"),
        ({"stages": [], "extra": 1}, "unknown key.*'extra'"),
        ({"stages": [{"stage": "gptq", "bits": 5}]}, "gptq.bits must be one of"),
        ({"stages": [{"stage": "gptq", "group_size": 100}]}, "group_size"),
        ({"stages": [{"stage": "lora", "rank": -1}]}, "0 <= rank <= 4096"),
        ({"stages": [{"stage": "embedding", "bits": 2}]}, "embedding.bits"),
        ({"stages": [{"stage": "gptq"}, {"stage": "wanda"}]}, "order"),
        ({"stages": [{"stage": "wanda"}, {"stage": "wanda"}]}, "once"),
        ({"stages": [{"stage": "eora", "rank": 8}]}, "needs a gptq"),
        ({"stages": [{"stage": "lora", "merge": False}, {"stage": "gptq"}]}, "merge"),
        ({"stages": [{"wanda": 1}]}, "'stage' name"),
    ],
)
def test_rejections(data, match):
    with pytest.raises(SlmsearchError, match=match):
        Plan.from_dict(data)


def test_bad_yaml():
    with pytest.raises(SlmsearchError, match="YAML"):
        Plan.from_yaml("stages: [\n")


def test_effective_and_prefixes():
    plan = Plan((DepthPrune(drop=0), Wanda(sparsity=0.5), EmbeddingQuant(bits=16), Gptq()))
    assert plan.effective().stages == (Wanda(sparsity=0.5), Gptq())
    assert [len(p.stages) for p in FULL.prefixes()] == [1, 2, 3, 4, 5, 6]
    assert FULL.digest() != plan.digest()


def test_shape_arithmetic():
    from slmsearch.hwmodel import ModelShape

    base = ModelShape.from_hf_config(
        {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
         "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
    )
    shape = FULL.shape(base)
    assert shape.n_layers == 28
    assert shape.layers[0].linear_format.weight_bits == 4 and shape.layers[0].linear_format.group_size == 64
    assert shape.layers[0].sparsity.density == 0.5
    assert shape.layers[0].adapter.rank == 16
    assert shape.embedding_format.weight_bits == 8
    structured = Plan((Wanda(pattern="structured", mlp_fraction=0.25, kv_groups=1),)).shape(base)
    assert structured.layers[0].intermediate == 1536 - 384
    assert (structured.layers[0].n_kv_heads, structured.layers[0].n_heads) == (2, 6)
    idle = Plan((DepthPrune(drop=0), Wanda(sparsity=0.0), LoraRecovery(rank=0, merge=False), EmbeddingQuant(bits=16), Eora(rank=0)))
    assert idle.shape(base) == base


def test_label_columns_and_meta_come_from_the_stages():
    assert FULL.label() == "drop2 wandaunstructured@0.50 lora8 emb8 w4g64 eora16"
    assert Plan(()).label() == "baseline"
    assert FULL.columns() == {"drop_layers": 2, "wanda": "unstructured", "embedding_bits": 8, "embedding_wide_rows": 0, "gptq_bits": 4,
                              "gptq_wider_layers": 0, "gptq_scale_bits": 16, "minmax_bits": 16, "kv_cache_bits": 16}
    assert Plan(()).columns() == {"drop_layers": 0, "wanda": "none", "embedding_bits": 16, "embedding_wide_rows": 0, "gptq_bits": 16,
                                  "gptq_wider_layers": 0, "gptq_scale_bits": 16, "minmax_bits": 16, "kv_cache_bits": 16}
    assert FULL.checkpoint_meta() == {
        "sparsity": {"format": "unstructured", "density": 0.5},
        "embedding": {"bits": 8, "group_size": None, "zero_bits": 0},
        "adapter": {"rank": 16, "bits": 16},  # the merged LoRA declares nothing; EoRA does
    }
    # stages that do nothing declare nothing, as they change no shape
    idle = Plan((Wanda(sparsity=0.0), LoraRecovery(rank=4, steps=0, merge=False), EmbeddingQuant(bits=16)))
    assert idle.checkpoint_meta() == {"sparsity": {"format": "dense", "density": 1.0}}
    assert Plan(()).checkpoint_meta() == idle.checkpoint_meta()
    kept = Plan((Wanda(pattern="2:4"), LoraRecovery(rank=4, merge=False)))
    assert kept.checkpoint_meta()["adapter"] == {"rank": 4, "bits": 16}
    assert kept.checkpoint_meta()["sparsity"] == {"format": "2:4", "density": 0.5}
