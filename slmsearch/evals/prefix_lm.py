"""lm-eval's HF model with a shared-prompt KV cache for generation tasks.

Few-shot generation (TriviaQA, 5 shots) spends most of its compute on the prompt: every question
repeats the same ~150 shot tokens. When every request of a ``generate_until`` call starts with
the same tokens (the task samples its shots with ``first_n``), :class:`PrefixCachedHFLM` runs
those tokens through the model once, then generates each request from a copy of that KV cache,
feeding only its own tokens. Keys and values of the prefix depend on the prefix tokens alone
(causal attention, positions from 0), so greedy outputs are those of the full prompt up to float
rounding. A batch is generated as ``[prefix | left-padded suffixes]`` from the cache repeated per
row; a batch whose prompts do not all start with the prefix (truncated) takes lm-eval's own path.

Imports lm-eval at module level: import this module only where an evaluation runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria

MIN_PREFIX_TOKENS = 32  # below this a shared prefix saves less than the cache copies cost


def common_prefix(rows: list[list[int]]) -> list[int]:
    """The longest run of tokens every row starts with, leaving each row at least one token."""
    if not rows:
        return []
    first = rows[0]
    n = min(len(r) for r in rows) - 1
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return first[: max(n, 0)]


class PrefixCachedHFLM(HFLM):
    """``HFLM`` whose ``generate_until`` reuses the KV cache of the prompt all requests share."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefix: torch.Tensor | None = None
        self._prefix_cache: Any = None
        self.prefix_stats = {"requests": 0, "prefix_tokens": 0, "suffix_tokens": 0}

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        contexts = [self.tok_encode(r.args[0]) for r in requests]
        shared = common_prefix(contexts)
        if len(shared) < MIN_PREFIX_TOKENS:
            return super().generate_until(requests, disable_tqdm)  # nothing worth sharing
        self._prefix = torch.tensor(shared, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self._prefix_cache = self.model(input_ids=self._prefix[None], use_cache=True).cache
        self.prefix_stats["prefix_tokens"] = len(shared)
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self._prefix = self._prefix_cache = None

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        mask = generation_kwargs.get("attention_mask")
        rows = list(context) if mask is None else [row[m.bool()] for row, m in zip(context, mask)]  # unpadded
        n_prefix = 0 if self._prefix is None else self._prefix.numel()
        shared = n_prefix > 0 and all(r.numel() > n_prefix and torch.equal(r[:n_prefix], self._prefix) for r in rows)
        if not shared or generation_kwargs.get("do_sample"):  # lm-eval's own path (e.g. a truncated prompt)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        generation_kwargs.pop("attention_mask", None)
        generation_kwargs.pop("temperature", None)  # greedy
        generation_kwargs["do_sample"] = False
        pad = self.tokenizer.pad_token_id
        batch = len(rows)
        # [prefix | left-padded suffixes]: positions come from the mask's cumulative sum, so every
        # suffix token sits right after the prefix as in its own unpadded prompt
        width = max(r.numel() for r in rows) - n_prefix
        suffix = context.new_full((batch, width), pad)
        suffix_mask = torch.zeros_like(suffix)
        for i, r in enumerate(rows):
            n = r.numel() - n_prefix
            suffix[i, width - n :] = r[n_prefix:]
            suffix_mask[i, width - n :] = 1
        input_ids = torch.cat([self._prefix.expand(batch, -1), suffix], dim=1)
        attention_mask = torch.cat([torch.ones_like(input_ids[:, :n_prefix]), suffix_mask], dim=1)
        cache = copy.deepcopy(self._prefix_cache)
        cache.batch_repeat_interleave(batch)
        new_tokens = max_length - context.shape[1]
        generated = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            max_new_tokens=new_tokens,
            stopping_criteria=stop_sequences_criteria(self.tokenizer, stop, input_ids.shape[1], batch),
            pad_token_id=pad,
            use_cache=True,
            **generation_kwargs,
        )[:, input_ids.shape[1] :]
        out = torch.full((batch, max_length), pad, dtype=context.dtype, device=context.device)
        out[:, : context.shape[1]] = context
        out[:, context.shape[1] : context.shape[1] + generated.shape[1]] = generated
        self.prefix_stats["requests"] += batch
        self.prefix_stats["suffix_tokens"] += int(suffix_mask.sum())
        return out


class ProgressMixin:
    """Put in front of an HFLM class: a ``[lm-eval]`` line every ~10 s while requests run
    (lm-eval's own bar, drawn only on a terminal and updated per request, sat at 0% for minutes):
    rolling-loglikelihood windows scored (pages asked) and generation requests answered."""

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from slmsearch.progress import Ticker

        self._ticker = Ticker("lm-eval", None, "loglikelihood windows", note_total=f"{len(requests)} pages")
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm)  # type: ignore[misc]
        finally:
            self._ticker = None

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from slmsearch.progress import Ticker

        self._ticker = Ticker("lm-eval", len(requests), "generation requests")
        try:
            return super().generate_until(requests, disable_tqdm)  # type: ignore[misc]
        finally:
            self._ticker = None

    def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super()._model_call(inps, *args, **kwargs)  # type: ignore[misc]
        ticker = getattr(self, "_ticker", None)
        if ticker is not None and ticker.total is None:
            ticker.tick(int(inps.shape[0]))
        return out

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        out = super()._model_generate(context, max_length, stop, **kwargs)  # type: ignore[misc]
        ticker = getattr(self, "_ticker", None)
        if ticker is not None and ticker.total is not None:
            ticker.tick(int(context.shape[0]))
        return out


class ProgressPrefixCachedHFLM(ProgressMixin, PrefixCachedHFLM):
    """:class:`PrefixCachedHFLM` with progress lines."""


class ProgressHFLM(ProgressMixin, HFLM):
    """lm-eval's ``HFLM`` with progress lines."""

