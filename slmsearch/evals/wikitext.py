"""WikiText-2 test perplexity, two ways, named for what each computes.

* ``wikitext_token_ppl``: the GPTQ/WANDA papers' convention. The test rows are joined with
  ``"\\n\\n"``, tokenized once, cut into non-overlapping windows of ``seqlen`` tokens, and the
  perplexity is ``exp`` of the mean next-token NLL over the first ``n_windows`` windows.
* ``wikitext_word_ppl``: lm-eval's document-level ``wikitext`` task (rolling log-likelihood per
  page, normalised by the page's word count), plus ``byte_ppl`` and ``bits_per_byte``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmsearch.data import wikitext_ids
from slmsearch.errors import SlmsearchError


def test_windows(tokenizer: Any, data_dir: Path, seqlen: int, n_windows: int | None) -> Any:
    """The first ``n_windows`` non-overlapping windows (LongTensor [n, seqlen]) of the test text."""
    ids = wikitext_ids("test", data_dir, tokenizer)
    available = ids.numel() // seqlen
    count = available if n_windows is None else n_windows
    if not 1 <= count <= available:
        raise SlmsearchError(
            f"wikitext token windows must be between 1 and {available} at seqlen {seqlen}, got {count}"
        )
    return ids[: count * seqlen].view(count, seqlen)


def window_nlls(model: Any, windows: Any, *, batch_size: int = 8, progress: bool = False) -> Any:
    """Mean next-token NLL of each window (FloatTensor [n]), float64 accumulation."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = []
    starts = range(0, windows.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="token ppl", unit="batch", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits.float()  # a no-op for fp32 models
            # Targets shifted in place of the logits: slicing the logits to [:, :-1] would copy
            # them (49k x tokens floats), which cost as much as the loss itself; the last
            # position has no target and is ignored (its loss is 0, then dropped).
            targets = batch.roll(-1, dims=1)
            targets[:, -1] = -100
            nll = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="none", ignore_index=-100
            )
            out.append(nll.view(batch.shape[0], -1)[:, :-1].double().mean(dim=1).cpu())
    return torch.cat(out)


def token_perplexity(
    model: Any,
    tokenizer: Any,
    data_dir: Path,
    *,
    seqlen: int = 512,
    n_windows: int | None = None,
    batch_size: int = 8,
    on_chunk: Callable[[int, float], None] | None = None,
    chunk_windows: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """(token perplexity, windows scored). ``on_chunk(windows_done, ppl_so_far)`` is called after
    every ``chunk_windows`` windows, so a caller can stop a hopeless evaluation early (it may raise)."""
    import torch

    windows = test_windows(tokenizer, data_dir, seqlen, n_windows)
    step = chunk_windows or windows.shape[0]
    nlls: list[Any] = []
    for start in range(0, windows.shape[0], step):
        nlls.append(window_nlls(model, windows[start : start + step], batch_size=batch_size, progress=progress))
        done = torch.cat(nlls)
        if on_chunk is not None:
            on_chunk(int(done.numel()), math.exp(float(done.mean())))
    mean = float(torch.cat(nlls).mean())
    return math.exp(mean), int(windows.shape[0])


def word_perplexity(
    model: Any,
    tokenizer: Any,
    data_dir: Path | None,
    *,
    pages: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """lm-eval's wikitext metrics: ``wikitext_word_ppl``, ``wikitext_byte_ppl``, ``wikitext_bits_per_byte``."""
    from slmsearch.evals.lmeval import run_lm_eval

    out = run_lm_eval(
        model, tokenizer, ["wikitext"], data_dir=data_dir, num_fewshot=0,
        limit=pages if data_dir is None else None, word_pages=pages,
        max_length=max_length, batch_size=batch_size,
    )
    (task_result,) = out["results"].values()
    return {
        "wikitext_word_ppl": float(task_result["word_perplexity,none"]),
        "wikitext_byte_ppl": float(task_result["byte_perplexity,none"]),
        "wikitext_bits_per_byte": float(task_result["bits_per_byte,none"]),
        "wikitext_pages": int(out["n-samples"][next(iter(out["results"]))]["effective"]),
    }
