"""The checkpoint folder: its file names, and how one is saved, loaded, recognized and copied.

A checkpoint folder is a Hugging Face model folder (``config.json``, ``*.safetensors``, the
tokenizer files), written by ``save_pretrained`` or, for a GPTQ model, by gptqmodel (which adds
``quantize_config.json`` and a ``quantization_config`` in ``config.json``). slmsearch adds:

- ``adapter/``: at most one adapter in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors``): EoRA beside a GPTQ model, or a LoRA kept unmerged;
- ``embedding-packed.safetensors``: a quantized embedding (and untied lm_head) as packed codes and
  16-bit scales (:func:`pack_codes`; ``<name>.rtn_codes`` uint8, ``<name>.rtn_scales`` fp16), and the
  decoder Linears of the ``minmax`` stage the same way with a 16-bit minimum per group
  (``<name>.rtn_mins``; ``<name>`` the module's path, e.g. ``model.layers.0.mlp.up_proj``). A stage-cache
  entry holds it beside the dense (dequantized) tensor the later stages read; a finished folder
  (:func:`finish`: ``slmsearch compress --out``, ``slmsearch export``) holds only the packed one,
  so the files are the size the memory model counts, and :func:`load` unpacks it bit for bit;
  a finished GPTQ folder also leaves out the ``g_idx`` / ``qzeros`` tensors that carry nothing
  (:mod:`slmsearch.gptq_compact`; listed under ``gptq_derived`` in ``slmsearch.json``), rebuilt on load;
- ``slmsearch.json`` (the meta file): what the tensors cannot tell the hardware model
  (a fake-quantized embedding's width, the sparsity format, the adapter), read by
  :mod:`slmsearch.hwmodel.checkpoint_shape`;
- ``plan.json`` and ``reports.json``: the plan that made the folder and what each stage did.

At module level only the standard library, ``errors`` and ``fsutil`` are imported, so the hardware
model can import the names; torch, transformers, peft, gptqmodel and the compress modules are
imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.errors import SlmsearchError
from slmsearch.fsutil import atomic_file, write_text_atomic

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.plan import Plan
    from slmsearch.compress.stage import StageReport

CONFIG_FILE = "config.json"  # Hugging Face's model config
META_FILE = "slmsearch.json"  # what the tensors cannot tell the hardware model
PLAN_FILE = "plan.json"  # the plan that made the folder
REPORTS_FILE = "reports.json"  # one StageReport per stage run
QUANTIZE_CONFIG_FILE = "quantize_config.json"  # written by gptqmodel beside a GPTQ model
ADAPTER_DIR = "adapter"  # the one adapter folder: EoRA (GPTQ) or a kept LoRA (peft)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's adapter config (``r`` is the rank)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PACKED_EMBEDDING_FILE = "embedding-packed.safetensors"  # packed codes + scales of a quantized embedding
SCALE_CODES_FILE = "gptq-scales.safetensors"  # GPTQ scales on 8-bit log2 grids: the grids, a finished folder's codes
SIDE_FILES = (PACKED_EMBEDDING_FILE, SCALE_CODES_FILE)  # safetensors files that are not model weight files
DERIVED_KEY = "gptq_derived"  # meta: the GPTQ tensor kinds a finished folder left out (finish, gptq_compact)
# set on a model by EmbeddingQuant ({"embed"|"lm_head": PackedTensor}) and MinMaxQuant ({module path: PackedTensor})
PACKED_ATTR = "_slmsearch_packed"
PACKED_NAMES = {"embed": "model.embed_tokens", "lm_head": "lm_head"}  # safetensors prefixes (LLaMA names)
# Tensor names <prefix>.rtn_codes / .rtn_scales: never GPTQ's ``.qweight``/``.scales``, which
# gptqmodel looks for in every *.safetensors of a folder to decide that the embedding is quantized.
CODES, SCALES, MINS = "rtn_codes", "rtn_scales", "rtn_mins"
SCALE_GRID = "rtn_scale_grid"  # <prefix>.rtn_scale_grid: float32 [lowest log2, step]; the scales then stored as uint8 codes
TOP = "top"  # <prefix>.top.<CODES|SCALES|MINS>: the wider first rows of a packed tensor (PackedTensor.top)


def packed_prefix(key: str) -> str:
    """The safetensors prefix of a packed tensor's key (the embedding's short names, else the path)."""
    return PACKED_NAMES.get(key, key)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


# format detection ------------------------------------------------------------------------------
def is_gptq_folder(folder: str | os.PathLike[str]) -> bool:
    """True when a checkpoint folder holds a GPTQ-quantized model."""
    folder = Path(folder)
    if (folder / QUANTIZE_CONFIG_FILE).is_file():
        return True
    config = folder / CONFIG_FILE
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


def quantize_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A GPTQ folder's quantize settings: ``quantize_config.json`` overridden by ``config.json``'s
    ``quantization_config`` (empty for a plain folder)."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    found = dict(config.get("quantization_config") or {})
    if (folder / QUANTIZE_CONFIG_FILE).is_file():
        found = {**_read_json(folder / QUANTIZE_CONFIG_FILE), **found}
    return found


def has_adapter(folder: str | os.PathLike[str]) -> bool:
    """True when a checkpoint folder holds an adapter under ``adapter/``."""
    return (Path(folder) / ADAPTER_DIR / ADAPTER_CONFIG_FILE).is_file()


def adapter_rank(folder: str | os.PathLike[str]) -> int | None:
    """The rank (``r``) of the folder's adapter, or None when it has none."""
    if not has_adapter(folder):
        return None
    return int(_read_json(Path(folder) / ADAPTER_DIR / ADAPTER_CONFIG_FILE)["r"])


# the records: meta, plan, reports --------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlmsearchError(f"cannot read {path}: {exc}") from None


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's ``slmsearch.json``; one SlmsearchError naming the file when it is missing,
    not JSON, or not a JSON object (re-create the checkpoint with ``slmsearch compress``)."""
    path = Path(folder) / META_FILE
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise SlmsearchError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def write_meta(folder: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Write ``slmsearch.json`` atomically (keys sorted, so equal metas are equal files)."""
    write_text_atomic(Path(folder) / META_FILE, json.dumps(meta, indent=1, sort_keys=True))


def write_records(folder: str | os.PathLike[str], plan: Plan, reports: list[StageReport], meta: dict[str, Any]) -> None:
    """Write ``plan.json``, ``reports.json`` and ``slmsearch.json`` (each atomically)."""
    folder = Path(folder)
    write_text_atomic(folder / PLAN_FILE, plan.to_json())
    write_text_atomic(folder / REPORTS_FILE, json.dumps([r.to_dict() for r in reports], indent=1, default=str))
    write_meta(folder, meta)


def read_reports(folder: str | os.PathLike[str]) -> list[StageReport]:
    """The stage reports of a folder (none when it has no ``reports.json``, e.g. a base model)."""
    from slmsearch.compress.stage import StageReport

    path = Path(folder) / REPORTS_FILE
    if not path.is_file():
        return []
    return [StageReport.from_dict(r) for r in _read_json(path)]


# copying ---------------------------------------------------------------------------------------
def copy_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, link_weights: bool = False) -> None:
    """Copy a checkpoint folder's files into ``dst`` (created), without the stage cache's
    bookkeeping (its manifest and LRU stamp).

    ``link_weights``: hard-link the ``*.safetensors`` where the file system allows (they are
    never rewritten in place, only replaced whole); every other file is copied, so that writing
    a small file of ``dst`` cannot write into ``src``'s inode.
    """
    from slmsearch.compress.cache import LAST_USED, MANIFEST

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        if path.is_dir() or path.name in (MANIFEST, LAST_USED):
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if link_weights and path.suffix == ".safetensors":
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copy2(path, target)


def copy_tokenizer(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy the tokenizer files ``src`` has and ``dst`` lacks."""
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


# the packed embedding --------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedTensor:
    """A round-to-nearest tensor as stored: uint8 ``codes`` ``[rows, cols]`` (one code a byte),
    ``scales`` ``[rows, groups]`` (fp16), the bit-width, and ``mins`` ``[rows, groups]`` (fp16) on an
    asymmetric grid (``w = min + code * scale``), or None on the symmetric one (zero point
    ``2**(bits-1)``). ``top``: the tensor's first rows, stored wider on the same grid (an
    embedding's most frequent token ids); ``codes`` then holds the rows after them.
    ``scale_grid``: the scales lie on this 8-bit log2 grid (:func:`compress.kernels.log_scale_grid`)
    and are stored as its codes; ``scales`` holds their fp16 values."""

    codes: Any
    scales: Any
    bits: int
    mins: Any = None
    top: PackedTensor | None = None
    scale_grid: Any = None

    def dense(self, dtype: Any) -> torch.Tensor:
        """The weights, exactly as the stage set them (:func:`compress.kernels.rtn_dequantize`,
        :func:`compress.kernels.minmax_dequantize`)."""
        import torch

        from slmsearch.compress.kernels import minmax_dequantize, rtn_dequantize

        if self.mins is not None:
            rest = minmax_dequantize(self.codes, self.scales, self.mins, dtype)
        else:
            rest = rtn_dequantize(self.codes, self.scales, self.bits, dtype)
        return rest if self.top is None else torch.cat([self.top.dense(dtype), rest])

    def parts(self, prefix: str) -> list[tuple[str, PackedTensor]]:
        """(safetensors prefix, tensor) of this tensor and of its wider first rows (``<prefix>.top``)."""
        own = [(prefix, dataclasses.replace(self, top=None))]
        return own if self.top is None else [*own, (f"{prefix}.{TOP}", self.top)]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[rows, cols]`` below ``2**bits`` -> ``[rows, cols * bits / 8]`` bytes, the first
    code of each byte in its low bits (``bits`` in 1, 2, 4, 8)."""
    import torch

    if bits not in (1, 2, 4, 8):
        raise SlmsearchError(f"packed codes need bits in 1, 2, 4, 8, got {bits}")
    per_byte = 8 // bits
    rows, cols = codes.shape
    if cols % per_byte:
        raise SlmsearchError(f"{cols} columns do not pack into whole bytes at {bits} bits")
    parts = codes.to(torch.uint8).reshape(rows, cols // per_byte, per_byte)
    out = torch.zeros(rows, cols // per_byte, dtype=torch.uint8)
    for k in range(per_byte):
        out |= parts[:, :, k] << (k * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`."""
    import torch

    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(per_byte)]
    # the columns named, not inferred: a tensor of no rows (an embedding whose rows are all wide) unpacks too
    return torch.stack(parts, dim=2).reshape(packed.shape[0], packed.shape[1] * per_byte).to(torch.uint8)


def has_packed_embedding(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / PACKED_EMBEDDING_FILE).is_file()


def write_packed(folder: str | os.PathLike[str], packed: dict[str, PackedTensor], dtype: str) -> None:
    """Write ``embedding-packed.safetensors``; ``dtype`` is the dense tensors' (what :func:`load` restores)."""
    from safetensors.torch import save_file

    tensors = {}
    bits = {}
    for key, tensor in packed.items():
        for prefix, p in tensor.parts(packed_prefix(key)):
            tensors[f"{prefix}.{CODES}"] = pack_codes(p.codes, p.bits).contiguous()
            tensors[f"{prefix}.{SCALES}"] = p.scales.contiguous() if p.scale_grid is None else _scale_codes_of(p, prefix)
            if p.scale_grid is not None:
                tensors[f"{prefix}.{SCALE_GRID}"] = p.scale_grid.contiguous()
            if p.mins is not None:
                tensors[f"{prefix}.{MINS}"] = p.mins.contiguous()
            bits[prefix] = p.bits
    meta = {"format": "slmsearch-rtn-packed", "bits": json.dumps(bits), "dtype": dtype}
    save_file(tensors, str(Path(folder) / PACKED_EMBEDDING_FILE), metadata=meta)


def _scale_codes_of(p: PackedTensor, prefix: str) -> torch.Tensor:
    """The uint8 codes of ``p``'s scales on its grid, checked to decode to them bit for bit."""
    import torch

    from slmsearch.compress.kernels import exact_log_scale_codes

    codes = exact_log_scale_codes(p.scales, p.scale_grid, 8) if p.scales.dtype == torch.float16 else None
    if codes is None:
        raise SlmsearchError(f"{prefix}: its scales are not on their 8-bit grid; re-create the checkpoint")
    return codes.contiguous()


def packed_widths(meta: dict[str, str]) -> dict[str, int]:
    """{tensor prefix: bits} from a packed file's metadata; ``{"*": bits}`` for files written before
    the minmax stage, which stored one width for every tensor."""
    stored = json.loads(meta.get("bits", "{}"))
    return {str(k): int(v) for k, v in stored.items()} if isinstance(stored, dict) else {"*": int(stored)}


def read_packed(folder: str | os.PathLike[str]) -> tuple[dict[str, PackedTensor], str]:
    """({"embed"|"lm_head"|module path: PackedTensor}, the dense dtype's name) of a folder's packed
    tensors (the embedding's, the minmax stage's Linears)."""
    from safetensors import safe_open

    path = Path(folder) / PACKED_EMBEDDING_FILE
    keys = {prefix: key for key, prefix in PACKED_NAMES.items()}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "slmsearch-rtn-packed":
            raise SlmsearchError(f"{path} is not a packed embedding (format {meta.get('format')!r})")
        widths = packed_widths(meta)
        names = set(f.keys())
        out = {}
        for prefix in sorted(n.removesuffix(f".{CODES}") for n in names if n.endswith(f".{CODES}")):
            bits = widths.get(prefix, widths.get("*"))
            if bits is None:
                raise SlmsearchError(f"{path}: no width recorded for {prefix}; re-create the checkpoint")
            mins = f.get_tensor(f"{prefix}.{MINS}") if f"{prefix}.{MINS}" in names else None
            codes = unpack_codes(f.get_tensor(f"{prefix}.{CODES}"), bits)
            scales = f.get_tensor(f"{prefix}.{SCALES}")
            grid = f.get_tensor(f"{prefix}.{SCALE_GRID}") if f"{prefix}.{SCALE_GRID}" in names else None
            if grid is not None:
                from slmsearch.compress.kernels import log_scale_values

                scales = log_scale_values(scales, grid).half()
            out[prefix] = PackedTensor(codes, scales, bits, mins, scale_grid=grid)
    tops = {prefix.removesuffix(f".{TOP}"): out.pop(prefix) for prefix in [p for p in out if p.endswith(f".{TOP}")]}
    for prefix, top in tops.items():
        if prefix not in out or top.codes.shape[1] != out[prefix].codes.shape[1]:
            raise SlmsearchError(f"{path}: wide rows {prefix}.{TOP} do not match {prefix}; re-create the checkpoint")
        out[prefix] = dataclasses.replace(out[prefix], top=top)
    return {keys.get(prefix, prefix): p for prefix, p in out.items()}, meta.get("dtype", "bfloat16")


def carry_packed(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src``'s packed embedding into ``dst`` (a folder stage's output, which gptqmodel wrote
    with the dense embedding it read from ``src``)."""
    if has_packed_embedding(src) and not has_packed_embedding(dst):
        shutil.copy2(Path(src) / PACKED_EMBEDDING_FILE, Path(dst) / PACKED_EMBEDDING_FILE)


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's model weight files (its packed embedding's and scale codes' files left out)."""
    return sorted(p for p in folder.glob("*.safetensors") if p.name not in SIDE_FILES)


def write_scale_grids(folder: str | os.PathLike[str], bits: int) -> int:
    """Round every GPTQ ``scales`` tensor of ``folder`` onto its own ``bits``-bit log2 grid
    (:func:`slmsearch.gptq_compact.on_log_grid`) and store the grids in :data:`SCALE_CODES_FILE`
    (:func:`finish` stores the codes there too). Returns the number of tensors rounded."""
    from safetensors.torch import save_file

    from slmsearch import gptq_compact

    grids: dict[str, torch.Tensor] = {}

    def edit(_: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        rounded, found = gptq_compact.on_log_grid(tensors, bits)
        grids.update(found)
        return rounded if found else None

    rewrite_weight_files(Path(folder), edit)  # a stage's output folder: discarded whole if this fails
    with atomic_file(Path(folder) / SCALE_CODES_FILE) as tmp:
        save_file(grids, str(tmp), metadata={"bits": str(bits)})
    return len(grids)


def _scale_file(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors, bits) of a folder's :data:`SCALE_CODES_FILE`."""
    from safetensors import safe_open

    with safe_open(str(folder / SCALE_CODES_FILE), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, int((f.metadata() or {}).get("bits", 8))


def has_scale_codes(folder: str | os.PathLike[str]) -> bool:
    """True when a finished folder stores its GPTQ scales as codes (:func:`finish`)."""
    from safetensors import safe_open

    from slmsearch.gptq_compact import SCALES

    path = Path(folder) / SCALE_CODES_FILE
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return any(n.endswith(f".{SCALES}") for n in f.keys())


def rewrite_weight_files(folder: Path, edit: Callable[[Path, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]) -> int:
    """Read each of a folder's weight files (:func:`weight_files`) whole and call ``edit(path,
    tensors)``: it returns the tensors to store instead, and the file is replaced atomically with
    its metadata kept, or None to leave the file as it is. Returns the number of files replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    replaced = 0
    for path in weight_files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        new = edit(path, tensors)
        if new is not None:
            with atomic_file(path) as tmp:
                save_file(new, str(tmp), metadata=meta)
            replaced += 1
    return replaced


def dense_names(folder: Path) -> list[str]:
    """The dense tensors a packed embedding replaces (a tied model's stored lm_head too)."""
    packed, _ = read_packed(folder)
    names = [f"{packed_prefix(k)}.weight" for k in packed]
    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    if "lm_head" not in packed and config.get("tie_word_embeddings", True):
        names.append("lm_head.weight")
    return names


def finish(folder: str | os.PathLike[str]) -> int:
    """Make ``folder`` a finished checkpoint, the files a deployment stores: where it holds a packed
    embedding, drop the dense copy (checked first to equal the unpacked codes bit for bit); in a
    GPTQ folder, drop the ``g_idx`` and ``qzeros`` tensors that carry nothing
    (:mod:`slmsearch.gptq_compact`, each checked to equal what :func:`load` rebuilds), and store
    scales made on 8-bit grids as their codes. The weight files are rewritten whole, their index
    updated. Returns the bytes saved."""
    folder = Path(folder)

    def stored() -> int:  # the codes finish writes count against what it saves
        codes = folder / SCALE_CODES_FILE
        return sum(p.stat().st_size for p in weight_files(folder)) + (codes.stat().st_size if codes.is_file() else 0)

    before = stored()
    if has_packed_embedding(folder):
        _drop_dense_embedding(folder)
    if is_gptq_folder(folder):
        _drop_derivable_gptq(folder)  # first: it reads each Linear's dimensions from its scales
        if (folder / SCALE_CODES_FILE).is_file():
            _store_scale_codes(folder)
    return before - stored()


def _store_scale_codes(folder: Path) -> None:
    """Leave the fp16 scales rounded to 8-bit grids out of the weight files and write their codes
    into :data:`SCALE_CODES_FILE` (one pass over the weights: :func:`finish` works on a folder
    that is discarded whole if it fails)."""
    from safetensors.torch import save_file

    from slmsearch import gptq_compact

    stored, bits = _scale_file(folder)
    codes: dict[str, torch.Tensor] = {}

    def edit(_: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        found = gptq_compact.scale_codes(tensors, stored, bits)
        codes.update(found)
        return {n: t for n, t in tensors.items() if n not in found} if found else None

    rewrite_weight_files(folder, edit)
    if not codes:
        return
    with atomic_file(folder / SCALE_CODES_FILE) as tmp:
        save_file({**stored, **codes}, str(tmp), metadata={"bits": str(bits)})
    _drop_from_index(folder, set(codes))


def _drop_dense_embedding(folder: Path) -> None:
    import torch

    packed, _ = read_packed(folder)
    drop = set(dense_names(folder))
    dense_dtypes: list[torch.dtype] = []

    def edit(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not drop & set(tensors):
            return None
        for key, p in packed.items():
            dense = tensors.get(f"{packed_prefix(key)}.weight")
            if dense is not None:
                dense_dtypes.append(dense.dtype)
                if not torch.equal(p.dense(dense.dtype), dense):
                    raise SlmsearchError(f"{path}: {packed_prefix(key)}.weight differs from its packed codes; re-create the checkpoint")
        return {n: t for n, t in tensors.items() if n not in drop}

    rewrite_weight_files(folder, edit)
    if dense_dtypes:  # record the dtype the dense copy had (gptqmodel may have changed it)
        write_packed(folder, packed, str(dense_dtypes[-1]).removeprefix("torch."))
    _drop_from_index(folder, drop)


def _drop_derivable_gptq(folder: Path) -> None:
    from slmsearch import gptq_compact

    group_size, sym = gptq_compact.layout(quantize_config(folder))
    kinds: set[str] = set()
    dropped: set[str] = set()

    def edit(_: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        drop = gptq_compact.derivable(tensors, group_size, sym)
        kinds.update(drop.values())
        dropped.update(drop)
        return {n: t for n, t in tensors.items() if n not in drop} if drop else None

    rewrite_weight_files(folder, edit)
    if dropped:
        _drop_from_index(folder, dropped)
        info = read_meta(folder) if (folder / META_FILE).is_file() else {}
        write_meta(folder, {**info, DERIVED_KEY: sorted(kinds | set(info.get(DERIVED_KEY, [])))})


def _drop_from_index(folder: Path, names: set[str]) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if k not in names}
        write_text_atomic(index, json.dumps(data, indent=2))


def derived_gptq(folder: str | os.PathLike[str]) -> list[str]:
    """The GPTQ tensor kinds a finished folder left out (``g_idx``, ``qzeros``; :func:`finish`)."""
    path = Path(folder) / META_FILE
    return list(read_meta(folder).get(DERIVED_KEY, [])) if path.is_file() else []


def _needs_view(folder: Path) -> bool:
    """True when neither transformers nor gptqmodel can read ``folder`` as it is: a finished
    folder with a packed embedding, or GPTQ tensors left out."""
    if derived_gptq(folder) or has_scale_codes(folder):
        return True
    if not has_packed_embedding(folder):
        return False
    from safetensors import safe_open

    names: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    with safe_open(str(folder / PACKED_EMBEDDING_FILE), framework="pt") as f:  # names only, no tensor read
        prefixes = [n.removesuffix(f".{CODES}") for n in f.keys() if n.endswith(f".{CODES}")]
    return any(f"{prefix}.weight" not in names for prefix in prefixes
               if prefix != PACKED_NAMES["lm_head"] and not prefix.endswith(f".{TOP}"))


def dense_view(folder: str | os.PathLike[str], view: str | os.PathLike[str]) -> Path:
    """Make ``view`` (an empty folder) a loadable copy of a finished ``folder``: links to every
    file, the weight files as shards of one index, and one more shard with what the folder left
    out: the unpacked embedding in its stored dtype, the GPTQ tensors :func:`finish` dropped.
    Transformers and gptqmodel load ``view``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slmsearch import gptq_compact

    folder, view = Path(folder).resolve(), Path(view)
    view.mkdir(parents=True, exist_ok=True)
    weights = weight_files(folder)
    for path in folder.iterdir():
        if path in weights or path.name in SIDE_FILES or path.name.endswith(".safetensors.index.json"):
            continue
        (view / path.name).symlink_to(path)
    n = len(weights) + 1
    weight_map: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for i, path in enumerate(weights, 1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        (view / shard).symlink_to(path)
        with safe_open(str(path), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), shard))
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    extra: dict[str, torch.Tensor] = {}
    if has_packed_embedding(folder):
        packed, dtype = read_packed(folder)
        extra.update({f"{packed_prefix(k)}.weight": p.dense(getattr(torch, dtype)).contiguous() for k, p in packed.items()})
    if has_scale_codes(folder):
        scales = gptq_compact.decoded_scales(_scale_file(folder)[0])
        extra.update(scales)
        shapes.update({name: list(t.shape) for name, t in scales.items()})
    derived = derived_gptq(folder)
    if derived:
        extra.update(gptq_compact.rebuilt(shapes, derived, gptq_compact.layout(quantize_config(folder))[0]))
    shard = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(extra, str(view / shard), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(extra, shard))
    index = {"metadata": {"total_size": sum(p.stat().st_size for p in weights)}, "weight_map": weight_map}
    (view / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return view


def disk_bytes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes on disk of a checkpoint folder: ``weights`` (every ``*.safetensors``, the adapter's
    and the packed embedding's included) and ``other`` (config, tokenizer, records, card)."""
    weights = other = 0
    for path in Path(folder).rglob("*"):
        if path.is_file():
            if path.suffix == ".safetensors":
                weights += path.stat().st_size
            else:
                other += path.stat().st_size
    return {"weights": weights, "other": other}


# saving and loading ----------------------------------------------------------------------------
def save(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> None:
    """``save_pretrained`` of model + tokenizer (safetensors), a kept LoRA adapter (set on the
    model by :class:`slmsearch.compress.lora.LoraRecovery` with ``merge=False``) under ``adapter/``,
    and a quantized embedding's codes (set by :class:`slmsearch.compress.embedding.EmbeddingQuant`)
    packed beside the dense weights (:func:`finish` drops the dense copy)."""
    from slmsearch.compress.lora import ADAPTER_ATTR

    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    adapter = getattr(model, ADAPTER_ATTR, None)
    if adapter is not None:
        from safetensors.torch import save_file

        (folder / ADAPTER_DIR).mkdir(exist_ok=True)
        adapter["config"].save_pretrained(str(folder / ADAPTER_DIR))
        save_file({k: v.contiguous() for k, v in adapter["state"].items()}, str(folder / ADAPTER_DIR / ADAPTER_WEIGHTS_FILE))
    packed = getattr(model, PACKED_ATTR, None)
    if packed:
        embed = model.get_input_embeddings().weight
        write_packed(folder, packed, str(embed.dtype).removeprefix("torch."))


def load(folder: str | os.PathLike[str], *, dtype: str = "float32", dense: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any checkpoint folder: plain HF (with a kept LoRA
    adapter applied through peft) or GPTQ (through gptqmodel, with its EoRA adapter).

    ``dtype`` is a plain model's; a GPTQ model is loaded in :func:`kernel_dtype` (bf16 where the
    CPU has it natively; else float16, gptqmodel's kernels for every width computing in it).
    ``dense``: a GPTQ model's quantized Linears become plain Linears in :func:`compute_dtype`
    (bf16, or float32 where bf16 is emulated: then the whole model is float32, its weights the grid's
    values exactly) holding the dequantized weights, EoRA merged (:func:`dequantize_to_dense`): the
    kernel model's function without its per-call dequantization. Evaluation uses it.
    A finished folder's packed embedding is unpacked (bit for bit what the stage computed) into a
    temporary dense view that transformers or gptqmodel reads (:func:`dense_view`)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise SlmsearchError(f"{folder} is not a checkpoint folder (no {CONFIG_FILE})")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if _needs_view(folder):  # a finished folder (packed embedding, GPTQ tensors left out): load a view of it
        with tempfile.TemporaryDirectory(prefix="slmsearch-unpacked-") as tmp:
            model = _load_model(dense_view(folder, tmp), folder, dtype, dense)
    else:
        model = _load_model(folder, folder, dtype, dense)
    model.eval()
    from slmsearch.compress.kvcache import install_from_folder

    install_from_folder(model, folder)  # a quantized KV cache: attention reads rounded keys and values
    return model, tokenizer


def _load_model(source: Path, folder: Path, dtype: str, dense: bool) -> Any:
    """The model of ``source`` (``folder`` itself or its dense view), adapters from ``folder``."""
    import torch

    adapter_dir = folder / ADAPTER_DIR
    if is_gptq_folder(folder):
        from slmsearch.compress.gptqmodel_runtime import compute_device, compute_dtype, gptqmodel_env, kernel_dtype

        gptqmodel_env()
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.adapter.adapter import Lora

        kwargs: dict[str, Any] = {}
        rank = adapter_rank(folder)
        if rank is not None:
            kwargs["adapter"] = Lora(path=str(adapter_dir), rank=rank)
        compute = compute_dtype()
        loaded = kernel_dtype(compute)
        if loaded != compute:  # float32 computation: gptqmodel's torch kernel in float16, every width
            kwargs["backend"] = BACKEND.TORCH
        model = GPTQModel.load(str(source), device=compute_device(), dtype=loaded, **kwargs).model
        if dense:
            dequantize_to_dense(model, compute)  # the kernel's compute dtype (bf16 on a CPU that has it)
            if loaded != compute:
                _restore_float_tensors(model, source, compute)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype))
        if has_adapter(folder):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model


def _restore_float_tensors(model: torch.nn.Module, source: Path, dtype: torch.dtype) -> None:
    """Cast ``model`` to ``dtype`` and read back, in ``dtype``, every stored floating tensor that it
    holds as a parameter or buffer (norms, the embedding, an unquantized head): loading through a
    narrower kernel dtype rounded them on the way in."""
    import torch
    from safetensors import safe_open

    model.to(dtype)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for path in weight_files(source):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    target = own.get(key)
                    if target is not None and target.is_floating_point():
                        target.copy_(f.get_tensor(key).to(dtype))


def dequantize_to_dense(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every gptqmodel quantized Linear of ``model`` by a plain ``nn.Linear`` in ``dtype``
    holding the weight gptqmodel's kernel computes with (``dequantize_weight``: the quantization
    grid's values), its EoRA adapter merged in (the kernel adds ``(x @ A) @ B``, the same as
    ``x @ (W + A @ B)``; the sum is formed in fp32 and rounded once).

    In the kernel's own compute dtype (bf16 on a CPU) the model computes what the kernel model
    does, without dequantizing every weight in every forward call: on a 2-core CPU a trial's
    evaluation runs ~2x faster (docs/benchmarks.md). Returns the number of modules replaced.
    """
    import torch

    from slmsearch.compress.gptqmodel_runtime import gptqmodel_env

    gptqmodel_env()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    replaced = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, BaseQuantLinear):
                    continue
                if dtype == torch.float32 and child.scales.dtype != torch.float32:
                    child.scales = child.scales.float()  # stored float16 scales x integer codes: exact in float32
                weight = child.dequantize_weight().float()  # [in, out]
                adapter = getattr(child, "adapter", None)
                if adapter is not None and getattr(adapter, "lora_A", None) is not None:
                    weight = weight + adapter.lora_A.float() @ adapter.lora_B.float()
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                        dtype=dtype, device=weight.device)
                dense.weight.copy_(weight.T.to(dtype))
                if child.bias is not None:
                    dense.bias.copy_(child.bias.to(dtype))
                setattr(parent, name, dense)
                replaced += 1
    return replaced
