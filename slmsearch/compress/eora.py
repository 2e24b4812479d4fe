"""EoRA adapters fitted in float32 by slmsearch's own layer loop, saved in gptqmodel's format.

gptqmodel's ``adapter.generate`` runs its quantized kernels, which compute in fp16/bf16 only; on a
CPU without native bf16 that emulation made EoRA ~48 s per decoder layer (an AVX2 AMD EPYC; ~3 s
on CPUs with bf16). Here the GPTQ folder's dense evaluation copy (:func:`slmsearch.checkpoint.load`
with ``dense``: the weights the evaluated model computes with) runs in float32, one decoder layer at
a time (:func:`slmsearch.compress.calib.layerwise`), and each Linear gets the factors of
:func:`slmsearch.compress.kernels.eigenspace_low_rank` for ``W - Q(W)`` (``W`` from the dense
folder GPTQ quantized) in the eigenspace of its own inputs.

As in gptqmodel's looper, the Linears of a layer are fitted in the order their inputs are formed
(q/k/v, then o, then gate/up, then down), each group's covariance taken with the earlier groups
already corrected, and a layer's outputs feed the next layer after its correction: each adapter
sees the inputs the adapted model gives it. Linears that share an input share one covariance and
one eigendecomposition. The adapter is written as gptqmodel writes its own (PEFT's layout:
``lora_A`` [rank, in] and ``lora_B`` [out, rank] under ``base_model.model.<module>``, in bf16, the
width the plan prices), so gptqmodel's loader applies it beside the quantized kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.checkpoint import ADAPTER_WEIGHTS_FILE
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.calib import Calibration, LayerInputs

# Linears of a LLaMA decoder layer in the order their inputs are formed; one input per group
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
ADAPTER_DTYPE = "bfloat16"  # stored width of A and B (16 bits: compress.stage.ADAPTER_BITS)


def input_covariance(layer: torch.nn.Module, module: torch.nn.Module, inputs: LayerInputs) -> torch.Tensor:
    """``X.T @ X`` / tokens (float64) of ``module``'s inputs over every calibration batch of ``layer``."""
    import torch

    total: torch.Tensor | None = None
    tokens = 0

    def hook(_: torch.nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal total, tokens
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        part = (x.T @ x).double()
        total = part if total is None else total + part
        tokens += x.shape[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                layer(hidden, **kwargs)
    finally:
        handle.remove()
    if total is None:
        raise SlmsearchError("eora: the calibration batches reached no Linear input (no calibration windows?)")
    return total / tokens


def fit_adapters(model: Any, reference: Callable[[str], torch.Tensor], calib: Calibration, rank: int,
                 on_layer: Callable[[int], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """EoRA factors ``{module name: (A [rank, in], B [out, rank])}`` for every decoder Linear of
    ``model`` (a dense float32 copy of the quantized model, changed in place: each weight ends as
    ``Q(W) + B @ A``); ``reference(name)`` is the unquantized weight ``W`` [out, in] of module ``name``."""
    import torch

    from slmsearch.compress import kernels
    from slmsearch.compress.calib import layerwise, linear_modules

    names = {id(m): n for n, m in model.named_modules()}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def visit(i: int, layer: torch.nn.Module, inputs: LayerInputs) -> None:
        modules = linear_modules(layer)
        grouped = [g for g in INPUT_GROUPS if all(n in modules for n in g)]
        rest = [(n,) for n in modules if not any(n in g for g in grouped)]
        for group in grouped + rest:
            space = kernels.input_eigenspace(input_covariance(layer, modules[group[0]], inputs))
            for rel in group:
                linear = modules[rel]
                name = names[id(linear)]
                delta = reference(name).float() - linear.weight.float()
                a, b = kernels.eigenspace_low_rank(delta, space, rank)
                with torch.no_grad():
                    linear.weight += (b @ a).to(linear.weight.dtype)
                factors[name] = (a, b)
        if on_layer is not None:
            on_layer(i)

    layerwise(model, calib, visit)
    return factors


def reference_weights(folder: Path) -> Callable[[str], torch.Tensor]:
    """``name -> weight`` of a dense checkpoint folder's ``<name>.weight`` tensors (read on demand)."""
    from safetensors import safe_open

    from slmsearch.checkpoint import weight_files

    where: dict[str, Path] = {}
    for path in weight_files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            where.update({key: path for key in f.keys()})

    def weight(name: str) -> torch.Tensor:
        key = f"{name}.weight"
        if key not in where:
            raise SlmsearchError(f"eora: {folder} holds no {key}; pass the dense folder GPTQ quantized")
        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key)

    return weight


def save_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                 base_name: str) -> None:
    """Write ``factors`` to ``folder`` (created) as gptqmodel's EoRA adapter: its ``LoraConfig``
    (``r`` = ``lora_alpha`` = ``rank``: scale 1, as its kernels apply it) and PEFT-named tensors."""
    import torch
    from safetensors.torch import save_file

    from slmsearch.compress import gptqmodel_runtime as runtime

    runtime.gptqmodel_env()
    from gptqmodel.adapter.peft import LoraConfig

    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, ADAPTER_DTYPE)
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    LoraConfig(base_model_name_or_path=base_name, r=rank, lora_alpha=rank, target_modules=targets).save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
