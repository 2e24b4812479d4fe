"""Measure a ModelShape from a (compressed) checkpoint folder, so model and checkpoint agree.

Read: config.json; safetensors headers (pure Python: 8-byte little-endian header length + JSON);
GPTQ tensors (qweight/qzeros/scales/g_idx) with quantization_config / quantize_config.json;
a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, in the checkpoint or in
``adapter/``); and ``slmsearch.json`` written by the compress pipeline for what the tensors cannot
tell (fake-quantized embedding, sparsity format, KV/activation precision); a finished folder's
packed embedding (``model.embed_tokens.rtn_codes`` + ``.rtn_scales``) is measured from its tensors. Shapes, layer count,
per-layer heads and intermediate sizes, bit-widths and group sizes come from the tensors;
a metadata number the tensors contradict is ignored. Tensor data is read (numpy) only to check a
declared sparsity against the actual zeros.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from slmsearch.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_DIR, CODES, META_FILE, MINS, PACKED_EMBEDDING_FILE, SCALES, TOP,
                                  packed_widths, quantize_config, read_meta)
from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel.shape import ATTN_PROJS, MLP_PROJS, Adapter, LayerShape, ModelShape, TensorFormat

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(\w+)$")
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "F8_E4M3": 8, "F8_E5M2": 8, "BOOL": 8}


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} without reading tensor data."""
    header = _raw_header(path)
    header.pop("__metadata__", None)
    return header


def _raw_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, ``__metadata__`` included."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SlmsearchError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise SlmsearchError(f"{path} is not a safetensors file (header length {n})")
        return dict(json.loads(f.read(n)))


def _packed_bits(folder: Path) -> dict[str, int]:
    """{tensor prefix: bits} of a folder's packed tensors, from the packed file's metadata (one
    width for every tensor in files written before the minmax stage); {} without the file."""
    path = folder / PACKED_EMBEDDING_FILE
    if not path.is_file():
        return {}
    return packed_widths(_raw_header(path).get("__metadata__") or {})


def _headers(folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for fp in files:
        for name, info in read_safetensors_header(fp).items():
            out[name] = (fp, info)
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlmsearchError(f"cannot read {path}: {e}") from None


def shape_from_checkpoint(path: str | Path) -> ModelShape:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SlmsearchError(f"{folder} has no config.json; give a Hugging Face checkpoint folder")
    cfg = _json(folder / "config.json")
    meta = read_meta(folder) if (folder / META_FILE).is_file() else {}
    tensors = _headers(folder)
    if not tensors:
        raise SlmsearchError(f"{folder} has no *.safetensors files")
    qcfg = quantize_config(folder)
    packed_bits = _packed_bits(folder)

    # group tensors per layer / projection
    layers: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
    for name, (_, info) in tensors.items():
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {}).setdefault(m.group(3), {})[m.group(4)] = info
    if not layers:
        raise SlmsearchError(f"{folder}: no tensors named model.layers.<i>.(self_attn|mlp).<proj>.*")

    emb = tensors.get("model.embed_tokens.weight")
    hidden = emb[1]["shape"][1] if emb else int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))

    layer_shapes = []
    for idx in sorted(layers):
        projs = layers[idx]
        missing = [p for p in ATTN_PROJS + MLP_PROJS if p not in projs]
        if missing:
            raise SlmsearchError(f"{folder}: layer {idx} lacks {missing}")
        dims: dict[str, tuple[int, int]] = {}
        fmts: dict[str, TensorFormat] = {}
        for proj, parts in projs.items():
            if proj not in ATTN_PROJS + MLP_PROJS:
                continue
            dims[proj], fmts[proj] = _proj_format(folder, idx, proj, parts, qcfg, packed_bits)
        q_out, k_out = dims["q_proj"][1], dims["k_proj"][1]
        if q_out % head_dim or k_out % head_dim:
            raise SlmsearchError(
                f"{folder}: layer {idx} q/k widths {q_out}/{k_out} are not multiples of head_dim {head_dim}; "
                f"write head_dim into config.json"
            )
        counts: dict[TensorFormat, int] = {}
        for f in fmts.values():
            counts[f] = counts.get(f, 0) + 1
        common = max(counts, key=lambda f: counts[f])
        layer_shapes.append(LayerShape(
            n_heads=q_out // head_dim, n_kv_heads=k_out // head_dim, head_dim=head_dim,
            intermediate=dims["gate_proj"][1], linear_format=common,
            proj_formats=tuple((p, f) for p, f in fmts.items() if f != common and p in ATTN_PROJS + MLP_PROJS),
        ))

    # embedding / lm_head
    vocab = emb[1]["shape"][0] if emb else int(cfg.get("vocab_size", 0))
    tied = not {"lm_head.weight", "lm_head.qweight", f"lm_head.{CODES}"} & set(tensors)
    emb_fmt = TensorFormat(weight_bits=_DTYPE_BITS.get(emb[1]["dtype"], 16)) if emb else TensorFormat()
    e_meta = meta.get("embedding") or {}
    packed = tensors.get(f"model.embed_tokens.{CODES}")  # a finished folder's packed embedding (checkpoint.py)
    if emb is None and packed is not None:
        scales = tensors[f"model.embed_tokens.{SCALES}"][1]
        vocab, groups = scales["shape"]
        top = tensors.get(f"model.embed_tokens.{TOP}.{CODES}")  # the wider first rows (PackedTensor.top)
        wide_rows = top[1]["shape"][0] if top else 0
        gs = e_meta.get("group_size")
        emb_fmt = TensorFormat(weight_bits=packed[1]["shape"][1] * 8 // hidden,
                               group_size=gs if gs and hidden // int(gs) == groups else (None if groups == 1 else hidden // groups),
                               scale_bits=_DTYPE_BITS.get(scales["dtype"], 16),
                               zero_bits=_DTYPE_BITS.get(tensors[f"model.embed_tokens.{MINS}"][1]["dtype"], 16)
                               if f"model.embed_tokens.{MINS}" in tensors else 0,
                               wide_rows=wide_rows, wide_bits=top[1]["shape"][1] * 8 // hidden if top else 8)
        vocab += wide_rows
    elif e_meta.get("bits") is not None and int(e_meta["bits"]) < emb_fmt.weight_bits:
        emb_fmt = TensorFormat(weight_bits=int(e_meta["bits"]), group_size=e_meta.get("group_size"),
                               scale_bits=int(e_meta.get("scale_bits", 16)), zero_bits=e_meta.get("zero_bits"),
                               wide_rows=int(e_meta.get("wide_rows", 0)))
    head_fmt = None
    if not tied:
        lm = tensors.get("lm_head.weight")
        head_fmt = TensorFormat(weight_bits=_DTYPE_BITS.get(lm[1]["dtype"], 16)) if lm else emb_fmt

    shape = ModelShape(
        hidden=hidden, layers=tuple(layer_shapes), vocab_size=vocab, tie_word_embeddings=tied,
        embedding_format=emb_fmt, lm_head_format=head_fmt,
        kv_cache_bits=int((meta.get("kv_cache") or {}).get("bits", 16)),
        kv_cache_group=(meta.get("kv_cache") or {}).get("group_size"),
        kv_cache_key_group=(meta.get("kv_cache") or {}).get("key_group_size"),
        kv_cache_rotate=bool((meta.get("kv_cache") or {}).get("rotate", False)),
        activation_bits=int(meta.get("activation_bits", 16)),
        name=str(cfg.get("_name_or_path", folder.name)),
    )
    shape = _apply_sparsity(shape, folder, tensors, meta.get("sparsity") or {})
    adapter = _adapter(folder, meta.get("adapter") or {})
    if adapter is not None:
        shape = shape.with_adapter(adapter.rank, adapter.bits)
    return shape


def _proj_format(folder: Path, idx: int, proj: str, parts: dict[str, dict[str, Any]], qcfg: dict[str, Any],
                 packed_bits: dict[str, int] | None = None) -> tuple[tuple[int, int], TensorFormat]:
    """((in_features, out_features), format) measured from the tensors of one projection; packed
    codes (the minmax stage's, :mod:`slmsearch.checkpoint`) win over a dense copy beside them."""
    if CODES in parts:
        group = "self_attn" if proj in ATTN_PROJS else "mlp"
        bits = (packed_bits or {}).get(f"model.layers.{idx}.{group}.{proj}", (packed_bits or {}).get("*"))
        if bits is None:
            raise SlmsearchError(f"{folder}: layer {idx} {proj} has packed codes but the packed file names no width")
        out_f, packed_cols = parts[CODES]["shape"]
        in_f = packed_cols * 8 // bits
        groups = parts[SCALES]["shape"][1]
        if "weight" in parts and parts["weight"]["shape"] != [out_f, in_f]:
            raise SlmsearchError(f"{folder}: layer {idx} {proj} packed codes do not match its weight's shape")
        return (in_f, out_f), TensorFormat(
            weight_bits=bits, group_size=None if groups == 1 else in_f // groups,
            scale_bits=_DTYPE_BITS.get(parts[SCALES]["dtype"], 16),
            zero_bits=_DTYPE_BITS.get(parts[MINS]["dtype"], 16) if MINS in parts else 0)
    if "weight" in parts:
        out_f, in_f = parts["weight"]["shape"]
        return (in_f, out_f), TensorFormat(weight_bits=_DTYPE_BITS.get(parts["weight"]["dtype"], 16))
    if "qweight" not in parts or "scales" not in parts:
        raise SlmsearchError(f"{folder}: layer {idx} {proj} has neither weight nor qweight+scales")
    groups, out_f = parts["scales"]["shape"]
    packed_rows = parts["qweight"]["shape"][0]
    cfg_group = int(qcfg.get("group_size") or -1)
    if "g_idx" in parts:
        in_f = parts["g_idx"]["shape"][0]
    elif cfg_group > 0:  # a finished folder leaves out g_idx when it is arange // group_size
        in_f = groups * cfg_group
    else:
        bits_cfg = int(qcfg.get("bits", 4))
        in_f = packed_rows * 32 // bits_cfg
    bits = packed_rows * 32 // in_f
    if packed_rows * 32 != bits * in_f:
        raise SlmsearchError(f"{folder}: layer {idx} {proj} qweight rows {packed_rows} do not pack {in_f} inputs")
    group_size = None if groups == 1 else in_f // groups
    if groups == 1 and cfg_group >= in_f:
        group_size = cfg_group  # one group spanning all inputs: same bytes as per-channel
    zero_bits = bits if "qzeros" in parts else 0
    scale_bits = _DTYPE_BITS.get(parts["scales"]["dtype"], 16)
    g_idx_bits = _DTYPE_BITS.get(parts["g_idx"]["dtype"], 32) if "g_idx" in parts else 0
    return (in_f, out_f), TensorFormat(weight_bits=bits, group_size=group_size, scale_bits=scale_bits,
                                       zero_bits=zero_bits, g_idx_bits=g_idx_bits)


def _apply_sparsity(shape: ModelShape, folder: Path, tensors: dict[str, tuple[Path, dict[str, Any]]],
                    declared: dict[str, Any]) -> ModelShape:
    fmt = declared.get("format", "dense")
    if fmt == "dense":
        return shape
    density = declared.get("density")
    names = [n for n in tensors if _LAYER.match(n) and n.endswith(".weight")]
    if names:  # unquantized weights: count the zeros, the tensors win
        n_m = tuple(int(x) for x in fmt.split(":")) if ":" in fmt else None
        measured, nm_ok = _measure_zeros(tensors, names, n_m)  # type: ignore[arg-type]
        if ":" in fmt and not nm_ok:
            fmt = "unstructured"
        density = measured
        if fmt != "unstructured" and ":" in fmt:
            n, m = (int(x) for x in fmt.split(":"))
            density = n / m
    return shape.with_sparsity(fmt, density)


def _measure_zeros(tensors: dict[str, tuple[Path, dict[str, Any]]], names: list[str],
                   n_m: tuple[int, int] | None) -> tuple[float, bool]:
    from safetensors.numpy import load_file

    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(tensors[n][0], []).append(n)
    nonzero = total = 0
    nm_ok = True
    for fp, ns in by_file.items():
        data = load_file(str(fp))
        for n in ns:
            w = data[n]
            nz = w != 0
            nonzero += int(nz.sum())
            total += w.size
            if n_m is not None and nm_ok:
                k, m = n_m
                if w.shape[-1] % m or (nz.reshape(-1, m).sum(axis=1) > k).any():
                    nm_ok = False
    return (nonzero / total if total else 1.0), nm_ok


def _adapter(folder: Path, declared: dict[str, Any]) -> Adapter | None:
    for sub in (folder / ADAPTER_DIR, folder):
        if (sub / ADAPTER_CONFIG_FILE).is_file():
            rank = int(_json(sub / ADAPTER_CONFIG_FILE).get("r", 0))
            bits = 16
            for fp in sub.glob("adapter_model*.safetensors"):
                for name, info in read_safetensors_header(fp).items():
                    if "lora_A" in name:
                        rank = info["shape"][0]  # measured
                        bits = _DTYPE_BITS.get(info["dtype"], 16)
                        break
            if declared.get("bits") is not None:
                bits = int(declared["bits"])
            return Adapter(rank, bits) if rank else None
    if declared.get("rank"):
        return Adapter(int(declared["rank"]), int(declared.get("bits", 16)))
    return None
