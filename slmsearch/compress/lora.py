"""LoRA recovery: a short peft LoRA fine-tune on calibration text, then merge or keep the adapter.

Training windows come from the first 90% of ``wiki.valid.tokens`` and the held-out loss from its
last 10% (never the test split). Merging keeps pruning: the merged delta is multiplied by the
mask of non-zero base weights, so a weight WANDA set to zero stays exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.compress.stage import ADAPTER_BITS, Stage, StageReport, Timer, check_range, space_first
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.calib import Calibration
    from slmsearch.hwmodel.shape import ModelShape

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LOSSES = ("lm", "kd")
KD_TOP_K = 64  # teacher log-probabilities kept per position (MiniLLM/DistiLLM-style truncation)
ADAPTER_ATTR = "_slmsearch_adapter"  # set on a model whose adapter is kept (merge=False)
HELDOUT_SEED_OFFSET = 1000  # held-out windows use seed + this (a different stream from training)
TRAIN_SEED_OFFSET = 1  # training windows use seed + this (not the calibration windows)


def mean_loss(model: Any, tokens: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``tokens`` ``[n, seqlen]``."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            ids = tokens[start : start + batch].to(device)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(out.loss) * n
            count += n
    return total / count


@dataclass(frozen=True)
class LoraRecovery(Stage):
    """Train LoRA adapters on ``targets`` for ``steps`` AdamW steps, then merge (masked) or keep."""

    kind = "lora"
    rank: int = 8  # LoRA rank r
    steps: int = 50  # optimizer steps
    lr: float = 2e-4  # AdamW learning rate (constant)
    targets: tuple[str, ...] = LORA_TARGETS  # projection names (peft target_modules)
    merge: bool = True  # merge into the weights (masked), or keep the adapter beside them
    batch: int = 2  # windows per step
    seqlen: int = 256  # tokens per window
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / rank)
    heldout: int = 8  # held-out windows for the before/after loss report; 0 = no report (a study's default)
    # "lm": next-token cross-entropy on the text; "kd": cross-entropy to the dense model's next-token
    # distribution (its top KD_TOP_K log-probabilities and the rest's mass; computed once per base model and
    # training windows, cached): recovery toward the teacher rather than adaptation to the text
    loss: str = "lm"

    def __post_init__(self) -> None:
        check_range("lora", "rank", self.rank, 0, 4096, integer=True)
        check_range("lora", "steps", self.steps, 0, 1_000_000, integer=True)
        check_range("lora", "lr", self.lr, 1e-8, 1.0)
        check_range("lora", "batch", self.batch, 1, 4096, integer=True)
        check_range("lora", "seqlen", self.seqlen, 8, 1 << 20, integer=True)
        check_range("lora", "alpha", self.alpha, 1e-6, 1e6)
        check_range("lora", "heldout", self.heldout, 0, 4096, integer=True)
        if not isinstance(self.merge, bool):
            raise SlmsearchError(f"lora.merge must be true or false, got {self.merge!r}")
        if self.loss not in LORA_LOSSES:
            raise SlmsearchError(f"lora.loss must be one of {', '.join(LORA_LOSSES)}, got {self.loss!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise SlmsearchError(f"lora.targets: unknown or empty {bad}; choose from {', '.join(LORA_TARGETS)}")

    def is_noop(self) -> bool:
        return self.rank == 0 or self.steps == 0

    def shape(self, shape: ModelShape) -> ModelShape:
        return shape if self.merge else shape.with_adapter(self.rank, ADAPTER_BITS)

    def checkpoint_meta(self) -> dict[str, Any]:
        """A kept adapter is declared (a merged one is in the weights)."""
        return {} if self.merge else {"adapter": {"rank": self.rank, "bits": ADAPTER_BITS}}

    def label(self) -> str:
        return f"lora{self.rank}" + ("kd" if self.loss == "kd" else "")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> LoraRecovery | None:
        """``lora_rank`` for ``lora_steps``, only after a stage that removed something (recovery);
        the held-out report's size is the space's ``lora_heldout``."""
        rank = int(params.get("lora_rank", 0))
        if not rank or not earlier:
            return None
        loss = str(params.get("lora_loss") or space_first(space, "lora_loss", "lm"))
        return cls(rank=rank, steps=int(params.get("lora_steps", 10)), heldout=space.lora_heldout, loss=loss)

    def apply(self, model: Any, calib: Calibration) -> StageReport:
        with Timer() as t:
            metrics = {"noop": True} if self.is_noop() else self._train(model, calib)
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)

    def _train(self, model: Any, calib: Calibration) -> dict[str, Any]:
        import torch

        from slmsearch.compress.gptqmodel_runtime import gptqmodel_env

        gptqmodel_env()  # peft imports gptqmodel when installed: its INFO banner off before that import
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        from slmsearch.progress import Ticker

        seed = calib.settings.seed
        train = calib.samples(self.steps * self.batch, seqlen=self.seqlen, seed=seed + TRAIN_SEED_OFFSET)
        held = calib.samples(self.heldout, part="heldout", seqlen=self.seqlen, seed=seed + HELDOUT_SEED_OFFSET) if self.heldout else None
        model.eval()
        teacher = teacher_top_k(calib, train, KD_TOP_K) if self.loss == "kd" else None
        loss_before = mean_loss(model, held) if held is not None else None
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=list(self.targets), bias="none"
        )
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        curve: list[float] = []
        peft_model.train()
        ticker = Ticker("lora", self.steps, "step")  # a line at the first and last step, and every ~10 s
        for step in range(self.steps):
            ids = train[step * self.batch : (step + 1) * self.batch].to(params[0].device)
            if teacher is None:
                loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                rows = slice(step * self.batch, (step + 1) * self.batch)
                logits = peft_model(input_ids=ids, use_cache=False).logits
                loss = kd_loss(logits, teacher[0][rows].to(logits.device), teacher[1][rows].to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curve.append(float(loss.detach()))
            ticker.tick(note=f"loss {curve[-1]:.3f}")
        peft_model.eval()
        del optimizer
        # One held-out loss after training, on the model that goes on: merged (below) or with the
        # adapter kept. (Scoring both the adapter and its merge was a third pass that changes nothing.)
        loss_after_adapter = None if self.merge or held is None else mean_loss(peft_model, held)
        zeros_before = 0
        if self.merge:
            zeros_before = _merge_masked(peft_model)
        else:
            adapter_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        base = peft_model.unload()  # removes the LoRA layers; the weights hold the merge (if any)
        if base is not model:  # peft unwraps in place; keep the caller's object authoritative
            raise SlmsearchError("peft returned a different model object after unload")
        for p in model.parameters():
            p.requires_grad_(False)
        metrics: dict[str, Any] = {"loss_curve": curve, "trainable_params": sum(p.numel() for p in params)}
        if held is not None:
            metrics["heldout_loss_before"] = loss_before
        if self.merge:
            if held is not None:
                metrics["heldout_loss_after_merge"] = mean_loss(model, held)
            metrics["zeros_kept"] = zeros_before
        else:
            if held is not None:
                metrics["heldout_loss_after"] = loss_after_adapter
            setattr(model, ADAPTER_ATTR, {"config": config, "state": adapter_state})
        return metrics


def kd_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from the teacher's next-token distribution to the student's, over the
    teacher's top-k tokens plus one bucket holding all the other tokens' mass (so the target keeps
    the teacher's confidence: renormalising the top-k alone would train the student to be sharper
    than the teacher). ``teacher_logprobs`` are the teacher's full-vocabulary log-probabilities of
    its top-k tokens. Equal to the KL divergence over those k+1 outcomes up to the teacher's
    entropy, a constant for the student."""
    import torch

    student_all = torch.log_softmax(student_logits.float(), dim=-1)
    student = student_all.gather(-1, teacher_ids.long())
    target = teacher_logprobs.float().exp()
    rest_target = (1 - target.sum(-1)).clamp_min(0)
    rest_student = torch.log1p(-student.exp().sum(-1).clamp(max=1 - 1e-6))
    return -((target * student).sum(-1) + rest_target * rest_student).mean()


def teacher_top_k(calib: Calibration, windows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's top-``k`` next-token log-probabilities and token ids for every position of
    ``windows`` (``[n, seqlen, k]`` fp16 and int32), cached in ``calib.score_dir`` by base model,
    windows and ``k``."""
    import hashlib

    import torch

    if not calib.base_location:
        raise SlmsearchError("lora.loss=kd needs the base model as its teacher (run it through the pipeline)")
    key = hashlib.sha256(f"{calib.model_key}|{k}|".encode() + windows.numpy().tobytes()).hexdigest()[:24]
    path = Path(calib.score_dir) / f"teacher-{key}.safetensors" if calib.score_dir is not None else None
    if path is not None and path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
            if data["values"].shape[:2] == windows.shape and data["ids"].shape == data["values"].shape:
                return data["values"], data["ids"]
        except (SafetensorError, KeyError, OSError):  # a torn or foreign file: computed again
            pass
    from slmsearch.checkpoint import load

    teacher, _ = load(calib.base_location)
    device = next(teacher.parameters()).device
    values, ids = [], []
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            logits = teacher(input_ids=windows[start : start + 4].to(device), use_cache=False).logits.float()
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            values.append(top.values.half().cpu())
            ids.append(top.indices.int().cpu())
    del teacher
    out = (torch.cat(values), torch.cat(ids))
    if path is not None:
        from safetensors.torch import save_file

        from slmsearch.fsutil import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"values": out[0].contiguous(), "ids": out[1].contiguous()}, str(tmp))
    return out


def _merge_masked(peft_model: Any) -> int:
    """Add each LoRA delta to its base weight where the base weight is non-zero; return the
    number of exact zeros among the targeted weights (unchanged by the merge)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from slmsearch.compress.kernels import masked_delta

    zeros = 0
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
                base = module.get_base_layer()
                delta = module.get_delta_weight("default")
                zeros += int((base.weight == 0).sum())
                base.weight.data += masked_delta(delta.to(base.weight.dtype), base.weight.data)
    return zeros
