"""Calibration data and layer-by-layer activation capture.

Calibration reads only ``wiki.valid.tokens`` (through :func:`slmsearch.data.calibration_tokens`):
``n_samples`` windows of ``seqlen`` tokens, tokenized once, at seeded offsets. Activations are
collected one decoder layer at a time, as in the WANDA and GPTQ reference code: the inputs of
layer i+1 are the outputs of layer i *after* layer i was compressed, and only one layer's inputs
are held in memory, so a 1B model calibrates in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmsearch.errors import SlmsearchError
from slmsearch.compress.surgery import decoder_layers


@dataclass(frozen=True)
class CalibSettings:
    """How calibration samples are drawn (part of every stage-cache key)."""

    n_samples: int = 32  # windows drawn from the first 90% of wiki.valid.tokens
    seqlen: int = 256  # tokens per window
    seed: int = 0  # offsets of the windows
    batch: int = 8  # windows per forward pass (memory only; results do not depend on it)

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seqlen < 2 or self.batch < 1:
            raise SlmsearchError(
                "calibration needs n_samples >= 1, seqlen >= 2 and batch >= 1, got "
                f"n_samples={self.n_samples}, seqlen={self.seqlen}, batch={self.batch}"
            )

    def key(self) -> dict[str, int]:
        """The fields that change results (``batch`` does not)."""
        return {"n_samples": self.n_samples, "seqlen": self.seqlen, "seed": self.seed}

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Calibration:
    """Everything a stage may read besides the model: tokens, tokenizer, where to cache scores."""

    settings: CalibSettings
    tokens: torch.Tensor  # [n_samples, seqlen] LongTensor from the train part
    tokenizer: Any = None
    data_dir: Path | None = None
    score_dir: Path | None = None  # folder for per-(model, calibration) score files (JSON)
    model_key: str = ""  # fingerprint of the model the plan starts from
    extra: dict[str, Any] = field(default_factory=dict)
    base_location: str = ""  # the model the plan starts from (a distilling stage's teacher)

    @classmethod
    def from_data(
        cls,
        tokenizer: Any,
        data_dir: Path,
        settings: CalibSettings = CalibSettings(),
        *,
        score_dir: Path | None = None,
        model_key: str = "",
    ) -> Calibration:
        from slmsearch.data import calibration_tokens

        tokens = calibration_tokens(
            tokenizer, data_dir, n_samples=settings.n_samples, seqlen=settings.seqlen, seed=settings.seed
        )
        return cls(settings, tokens, tokenizer, data_dir, score_dir, model_key)

    def token_batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.tokens.shape[0], self.settings.batch):
            yield self.tokens[start : start + self.settings.batch]

    def samples(self, n: int | None = None, *, part: str = "train", seqlen: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Further windows from ``wiki.valid.tokens`` (e.g. LoRA steps, held-out loss)."""
        if self.data_dir is None or self.tokenizer is None:
            raise SlmsearchError("this stage needs calibration built with Calibration.from_data (data dir + tokenizer)")
        from slmsearch.data import calibration_tokens

        return calibration_tokens(
            self.tokenizer,
            self.data_dir,
            n_samples=n or self.settings.n_samples,
            seqlen=seqlen or self.settings.seqlen,
            seed=self.settings.seed if seed is None else seed,
            part=part,
        )


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """The inputs of one decoder layer for every calibration batch: hidden states + kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        return iter(zip(self.hidden, self.kwargs))


@torch.no_grad()
def capture_first_inputs(model: Any, batches: list[torch.Tensor]) -> LayerInputs:
    """Run the embedding and stop at layer 0, keeping its hidden states and call kwargs
    (position embeddings, causal mask, position ids) for every batch."""
    first = decoder_layers(model)[0]
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden.append(args[0] if args else kwargs["hidden_states"])
        kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values", "use_cache")}
        kwargs_list.append(kept)
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, kwargs_list)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """The outputs of ``layer`` on ``inputs``, as the next layer's inputs."""
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(outs, inputs.kwargs)


class NormCollector:
    """Forward hooks that sum, per input feature, the squares of a set of Linear inputs."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.norm_sq: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = (x * x).sum(0)
            if name in self.norm_sq:
                self.norm_sq[name] += acc
            else:
                self.norm_sq[name] = acc

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of a decoder layer by relative name (``self_attn.q_proj``...)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def layerwise(
    model: Any,
    calib: Calibration,
    visit: Callable[[int, nn.Module, LayerInputs], None],
) -> None:
    """For each decoder layer in order: ``visit(i, layer, inputs)`` (which may change the layer),
    then feed the (changed) layer's outputs to the next layer."""
    was_training = model.training
    model.eval()
    try:
        inputs = capture_first_inputs(model, list(calib.token_batches()))
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            visit(i, layer, inputs)
            if i + 1 < len(layers):
                inputs = run_layer(layer, inputs)
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_norms(layer: nn.Module, inputs: LayerInputs, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-feature squared input norms of the layer's Linear modules (all, or ``names``)."""
    modules = linear_modules(layer)
    if names is not None:
        modules = {n: modules[n] for n in names}
    collector = NormCollector(modules)
    try:
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
    finally:
        collector.close()
    return collector.norm_sq
