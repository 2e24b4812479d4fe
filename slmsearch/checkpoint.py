"""The checkpoint folder: its file names, and how one is saved, loaded, recognized and copied.

A checkpoint folder is a Hugging Face model folder (``config.json``, ``*.safetensors``, the
tokenizer files), written by ``save_pretrained`` or, for a GPTQ model, by gptqmodel (which adds
``quantize_config.json`` and a ``quantization_config`` in ``config.json``). slmsearch adds:

- ``adapter/``: at most one adapter in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors``): EoRA beside a GPTQ model, or a LoRA kept unmerged;
- ``slmsearch.json`` (the meta file): what the tensors cannot tell the hardware model
  (a fake-quantized embedding's width, the sparsity format, the adapter), read by
  :mod:`slmsearch.hwmodel.checkpoint_shape`;
- ``plan.json`` and ``reports.json``: the plan that made the folder and what each stage did.

At module level only the standard library, ``errors`` and ``fsutil`` are imported, so the hardware
model can import the names; torch, transformers, peft, gptqmodel and the compress modules are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.errors import SlmsearchError
from slmsearch.fsutil import write_text_atomic

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


# saving and loading ----------------------------------------------------------------------------
def save(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> None:
    """``save_pretrained`` of model + tokenizer (safetensors), and a kept LoRA adapter (set on the
    model by :class:`slmsearch.compress.lora.LoraRecovery` with ``merge=False``) under ``adapter/``."""
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


def load(folder: str | os.PathLike[str], *, dtype: str = "float32", dense: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any checkpoint folder: plain HF (with a kept LoRA
    adapter applied through peft) or GPTQ (through gptqmodel, with its EoRA adapter).

    ``dtype`` is a plain model's; a GPTQ model computes in gptqmodel's dtype (bf16 on a CPU).
    ``dense``: a GPTQ model's quantized Linears become plain Linears in that dtype holding the
    dequantized weights, EoRA merged (:func:`dequantize_to_dense`): the kernel model's function
    without its per-call dequantization. Evaluation uses it."""
    import torch
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise SlmsearchError(f"{folder} is not a checkpoint folder (no {CONFIG_FILE})")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter_dir = folder / ADAPTER_DIR
    if is_gptq_folder(folder):
        from slmsearch.compress.gptqmodel_runtime import compute_device, gptqmodel_env

        gptqmodel_env()
        from gptqmodel import GPTQModel
        from gptqmodel.adapter.adapter import Lora

        kwargs: dict[str, Any] = {}
        rank = adapter_rank(folder)
        if rank is not None:
            kwargs["adapter"] = Lora(path=str(adapter_dir), rank=rank)
        model = GPTQModel.load(str(folder), device=compute_device(), **kwargs).model
        if dense:
            dequantize_to_dense(model, model.dtype)  # the kernel's compute dtype (bf16 on a CPU)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        if has_adapter(folder):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


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
