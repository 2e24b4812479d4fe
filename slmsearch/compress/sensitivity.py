"""How much each decoder layer's quantization hurts: the allocation behind mixed precision.

``layer_sensitivity`` rounds the Linear weights of one layer at a time (round-to-nearest on
GPTQ's symmetric grid, :func:`slmsearch.compress.kernels.rtn_quantize`) and measures the KL
divergence of the model's next-token distribution from the unrounded model's on calibration
windows. The layers with the largest divergence are those a wider width helps most (HAWQ and
its successors rank layers the same way, by the output error each one alone causes). The
scores are cached as JSON beside the depth scores, keyed by the input model and the setting, so a
study measures them once per model it quantizes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.fsutil import read_json_checked, write_json_checked

if TYPE_CHECKING:
    from slmsearch.compress.calib import Calibration

SENSITIVITY_VERSION = 2
MAX_WINDOWS = 2  # calibration windows scored per layer


def layer_sensitivity(model: Any, calib: Calibration, bits: int, group_size: int) -> list[float]:
    """Mean per-token KL(unrounded || layer ``l`` rounded to ``bits``) for every decoder layer.

    One unrounded pass keeps every layer's input; layer ``l``'s score then runs only layers
    ``l..L-1`` from its kept input (about half the work of full forward passes)."""
    import torch

    from slmsearch.compress.calib import capture_first_inputs
    from slmsearch.compress.kernels import rtn_quantize
    from slmsearch.compress.surgery import decoder_layers

    group = None if group_size == -1 else group_size
    layers = decoder_layers(model)
    model.eval()

    def run_from(index: int, hidden: Any, kwargs: dict[str, Any]) -> Any:
        for layer in layers[index:]:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return torch.log_softmax(model.lm_head(model.model.norm(hidden)).float(), dim=-1)

    with torch.no_grad():
        firsts = capture_first_inputs(model, [w[None] for w in calib.tokens[:MAX_WINDOWS]])
        windows = []  # per window: every layer's input, its call kwargs, the unrounded log-probs
        for hidden, kwargs in zip(firsts.hidden, firsts.kwargs):
            inputs = [hidden]
            for layer in layers:
                out = layer(inputs[-1], **kwargs)
                inputs.append(out[0] if isinstance(out, tuple) else out)
            reference = torch.log_softmax(model.lm_head(model.model.norm(inputs[-1])).float(), dim=-1)
            windows.append((inputs, kwargs, reference))
        scores: list[float] = []
        for index, layer in enumerate(layers):
            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            saved = [m.weight.data.clone() for m in linears]
            for m in linears:
                m.weight.data.copy_(rtn_quantize(m.weight.data, bits, group))
            total = 0.0
            for inputs, kwargs, reference in windows:
                logp = run_from(index, inputs[index], kwargs)
                total += float(torch.nn.functional.kl_div(logp[0], reference[0], log_target=True, reduction="batchmean"))
            for m, weight in zip(linears, saved):
                m.weight.data.copy_(weight)
            scores.append(total / len(windows))
    return scores


def cached_layer_sensitivity(load_model: Callable[[], Any], calib: Calibration, bits: int, group_size: int,
                             model_id: str) -> list[float]:
    """:func:`layer_sensitivity`, read from / written to ``calib.score_dir`` when it is set.
    ``model_id`` names the model's weights (e.g. its fingerprint and the plan that made it);
    ``load_model()`` is called only when the scores are not cached."""
    path: Path | None = None
    if calib.score_dir is not None:
        key = json.dumps({"model": model_id, "bits": bits, "group": group_size, "calib": calib.settings.key(),
                          "windows": MAX_WINDOWS, "v": SENSITIVITY_VERSION}, sort_keys=True)
        path = Path(calib.score_dir) / f"sensitivity-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        data = read_json_checked(path)
        if data is not None and data.get("key") == key:
            return [float(x) for x in data["scores"]]
    scores = layer_sensitivity(load_model(), calib, bits, group_size)
    if path is not None:
        write_json_checked(path, {"key": key, "scores": scores})
    return scores


def most_sensitive(scores: list[float], count: int) -> tuple[int, ...]:
    """The ``count`` layers with the largest scores (ties: the earlier layer), in layer order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(order[:count]))
