import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import ModelShape, TensorFormat
from slmsearch.hwmodel.checkpoint_shape import read_safetensors_header

CFG = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=48, vocab_size=100, tie_word_embeddings=True)


def _rng(shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float16)


def _write_checkpoint(folder, cfg, *, drop=(), gptq_bits=None, group=16, sparsity=None, adapter_rank=0):
    folder.mkdir()
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, inter = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    t = {"model.embed_tokens.weight": _rng((cfg["vocab_size"], h)), "model.norm.weight": _rng((h,))}
    kept = [i for i in range(cfg["num_hidden_layers"]) if i not in drop]
    for new, _ in enumerate(kept):
        pre = f"model.layers.{new}."
        t[pre + "input_layernorm.weight"] = _rng((h,))
        t[pre + "post_attention_layernorm.weight"] = _rng((h,))
        for name, i, o in [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                           ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter),
                           ("mlp.down_proj", inter, h)]:
            if gptq_bits:
                t[pre + name + ".qweight"] = np.zeros((i * gptq_bits // 32, o), np.int32)
                t[pre + name + ".qzeros"] = np.zeros((i // group, o * gptq_bits // 32), np.int32)
                t[pre + name + ".scales"] = np.ones((i // group, o), np.float16)
                t[pre + name + ".g_idx"] = np.arange(i, dtype=np.int32) // group
            else:
                w = _rng((o, i))
                if sparsity == "2:4":
                    w.reshape(-1, 4)[:, :2] = 0
                t[pre + name + ".weight"] = w
    save_file(t, str(folder / "model.safetensors"))
    c = dict(cfg)
    if gptq_bits:
        c["quantization_config"] = {"bits": gptq_bits, "group_size": group, "sym": True, "desc_act": False}
    (folder / "config.json").write_text(json.dumps(c))
    meta = {}
    if sparsity:
        meta["sparsity"] = {"format": sparsity, "density": 0.5}
    if adapter_rank:
        meta["adapter"] = {"rank": adapter_rank, "bits": 16}
    if meta:
        (folder / "slmsearch.json").write_text(json.dumps(meta))


def test_header_parser_reads_what_save_file_wrote(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file({"a": np.zeros((3, 5), np.float16)}, str(f))
    assert read_safetensors_header(f)["a"]["shape"] == [3, 5]
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10**12))
    with pytest.raises(SlmsearchError):
        read_safetensors_header(tmp_path / "bad.safetensors")


def test_from_checkpoint_equals_config_shape(tmp_path):
    _write_checkpoint(tmp_path / "ck", CFG)
    base = ModelShape.from_hf_config(CFG)
    got = ModelShape.from_checkpoint(tmp_path / "ck")
    assert got.layers == base.layers and got.hidden == base.hidden and got.vocab_size == base.vocab_size
    assert got.tie_word_embeddings


def test_from_checkpoint_equals_plan_shape_after_compression(tmp_path):
    # layers dropped and GPTQ 4-bit g16: the config still says 3 layers; the tensors win
    _write_checkpoint(tmp_path / "ck", CFG, drop=(1,), gptq_bits=4, group=16)
    expected = ModelShape.from_hf_config(CFG).drop_layers([1]).with_linear_format(
        TensorFormat(weight_bits=4, group_size=16, zero_bits=4, g_idx_bits=32))
    got = ModelShape.from_checkpoint(tmp_path / "ck")
    assert got.layers == expected.layers
    assert got.n_layers == 2


def test_from_checkpoint_sparsity_is_measured(tmp_path):
    _write_checkpoint(tmp_path / "ck", CFG, sparsity="2:4", adapter_rank=4)
    got = ModelShape.from_checkpoint(tmp_path / "ck")
    assert got.layers == ModelShape.from_hf_config(CFG).with_sparsity("2:4").with_adapter(4, 16).layers


def test_from_checkpoint_declared_sparsity_contradicted_by_tensors(tmp_path):
    _write_checkpoint(tmp_path / "ck", CFG)  # dense random weights
    (tmp_path / "ck" / "slmsearch.json").write_text(json.dumps({"sparsity": {"format": "2:4", "density": 0.5}}))
    got = ModelShape.from_checkpoint(tmp_path / "ck")
    assert got.layers[0].sparsity.format == "unstructured"
    assert got.layers[0].sparsity.density > 0.99


def test_reading_a_checkpoint_does_not_import_torch(tmp_path):
    _write_checkpoint(tmp_path / "ck", CFG, gptq_bits=4, group=16, adapter_rank=4)
    code = ("import sys; from slmsearch.hwmodel import ModelShape; import slmsearch.hwmodel.summary, "
            "slmsearch.hwmodel.validate; s = ModelShape.from_checkpoint(sys.argv[1]); "
            "print(s.n_layers, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "False"]
