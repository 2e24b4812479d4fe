"""Running lm-eval on an in-memory model, with the local task files or lm-eval's hub tasks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from slmsearch.data import data_path, triviaqa_split
from slmsearch.fsutil import atomic_dir, cache_dir

TASK_TEMPLATES = Path(__file__).parent / "tasks"
LOCAL_TASKS = {"wikitext": "slmsearch_wikitext", "triviaqa": "slmsearch_triviaqa"}


def _offline_env() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def local_task_dir(data_dir: Path, *, word_pages: int | None, triviaqa_limit: int | None) -> Path:
    """Write (once) the local task YAMLs and the derived data files into the cache; return the folder.

    The data folder stays read-only: the page subset and the scored/few-shot TriviaQA files are
    derived here, keyed by the data hashes and the limits.
    """
    pages_src = data_path(data_dir, "wikitext_test_pages")
    templates = sorted(p for p in TASK_TEMPLATES.iterdir() if p.is_file())
    key_src = json.dumps(  # the templates' contents too: an edited task file must not reuse an old folder
        [str(pages_src), word_pages, triviaqa_limit, [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in templates]]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    folder = cache_dir("evals") / f"tasks-{key}"
    if (folder / "DONE").is_file():
        return folder
    scored, fewshot = triviaqa_split(data_dir)
    if triviaqa_limit is not None:
        scored = scored[:triviaqa_limit]
    with atomic_dir(folder) as tmp:
        pages = pages_src.read_text(encoding="utf-8").splitlines()
        if word_pages is not None:
            pages = pages[:word_pages]
        (tmp / "pages.jsonl").write_text("\n".join(pages) + "\n", encoding="utf-8")
        for name, rows in (("triviaqa_scored.jsonl", scored), ("triviaqa_fewshot.jsonl", fewshot)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        shutil.copy(TASK_TEMPLATES / "wikitext_hooks.py", tmp / "wikitext_hooks.py")
        fills = {
            "@PAGES@": str(folder / "pages.jsonl"),
            "@SCORED@": str(folder / "triviaqa_scored.jsonl"),
            "@FEWSHOT@": str(folder / "triviaqa_fewshot.jsonl"),
        }
        for template in TASK_TEMPLATES.glob("*.yaml.in"):
            text = template.read_text(encoding="utf-8")
            for mark, value in fills.items():
                text = text.replace(mark, value)
            (tmp / template.name.removesuffix(".in")).write_text(text, encoding="utf-8")
        (tmp / "DONE").write_text("ok\n")
    return folder


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    data_dir: Path | None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    word_pages: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    log_samples: bool = False,
    prefix_cache: bool = True,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on an in-memory model; ``tasks`` are 'wikitext'/'triviaqa'.

    With a data dir the local mirrors run offline; without one, lm-eval's hub tasks run.
    Generation reuses the KV cache of the prompt every request shares (``prefix_cache``; see
    :mod:`slmsearch.evals.prefix_lm`); ``False`` runs lm-eval's own ``HFLM`` (batched, padded).
    Returns lm-eval's result dict (``results[task][metric,filter]``, ``samples`` when logged),
    plus ``prefix_cache``: the shared-prefix counts of the cached path.
    """
    _offline_env() if data_dir is not None else None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from slmsearch.evals.prefix_lm import PrefixCachedHFLM

    if data_dir is not None:
        folder = local_task_dir(data_dir, word_pages=word_pages, triviaqa_limit=limit)
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        names = [LOCAL_TASKS[t] for t in tasks]
        task_limit = None  # the derived files already hold exactly the scored rows
    else:
        manager = TaskManager()
        names = list(tasks)
        task_limit = limit
    device = str(next(model.parameters()).device)
    lm_class = PrefixCachedHFLM if prefix_cache else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    results = simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=task_limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    assert results is not None  # only None on non-zero ranks of a distributed run
    out = dict(results)
    out["prefix_cache"] = dict(getattr(lm, "prefix_stats", {}))
    return out
