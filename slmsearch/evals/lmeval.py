"""Running lm-eval on an in-memory model, with the local task files or lm-eval's hub tasks.

Nothing executable is read from the cache. The local tasks' configurations are built here from the
packaged templates (``tasks/*.yaml.in``, read with the safe YAML loader) and handed to lm-eval as
dicts; the WikiText task's hooks are lm-eval's own functions, imported from the installed package.
The cache (``$SLMSEARCH_CACHE/evals/data-<sha>/``) holds only the derived data files (the page
subset, the scored and few-shot TriviaQA rows), and they are checked byte for byte against what the
verified data folder yields on every use: a changed, missing or extra file makes the folder be
rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmsearch.data import data_path, triviaqa_split
from slmsearch.fsutil import atomic_dir, cache_dir, owner_tag

TASK_TEMPLATES = Path(__file__).parent / "tasks"
LOCAL_TASKS = {"wikitext": "slmsearch_wikitext", "triviaqa": "slmsearch_triviaqa"}
_FILLS = {"@PAGES@": "pages.jsonl", "@SCORED@": "triviaqa_scored.jsonl", "@FEWSHOT@": "triviaqa_fewshot.jsonl"}


def _offline_env() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@lru_cache(maxsize=8)
def _derived_files(data_dir: Path, word_pages: int | None, triviaqa_limit: int | None, stamp: tuple[Any, ...]) -> dict[str, bytes]:
    """The derived data files' contents, from the verified data folder (``stamp``: its files' mtimes)."""
    pages = data_path(data_dir, "wikitext_test_pages").read_text(encoding="utf-8").splitlines()
    if word_pages is not None:
        pages = pages[:word_pages]
    scored, fewshot = triviaqa_split(data_dir)
    if triviaqa_limit is not None:
        scored = scored[:triviaqa_limit]
    return {
        "pages.jsonl": ("\n".join(pages) + "\n").encode("utf-8"),
        "triviaqa_scored.jsonl": "".join(json.dumps(r) + "\n" for r in scored).encode("utf-8"),
        "triviaqa_fewshot.jsonl": "".join(json.dumps(r) + "\n" for r in fewshot).encode("utf-8"),
    }


def _matches(folder: Path, expected: dict[str, bytes]) -> bool:
    """Exactly the expected files, byte for byte (nothing missing, changed or added)."""
    try:
        names = {p.name for p in folder.iterdir()}
        return names == set(expected) and all((folder / n).read_bytes() == data for n, data in expected.items())
    except OSError:
        return False


def local_task_dir(data_dir: Path, *, word_pages: int | None, triviaqa_limit: int | None) -> Path:
    """The folder of derived data files for these limits, in the cache, verified on every call.

    The data folder stays read-only. The folder's name is the sha256 of its contents; a folder that
    does not match byte for byte (changed, truncated, a file planted beside them) is removed and
    written again.
    """
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(data_dir).rglob("*")) if p.is_file())
    expected = _derived_files(Path(data_dir), word_pages, triviaqa_limit, stamp)
    key = hashlib.sha256(json.dumps({n: hashlib.sha256(d).hexdigest() for n, d in sorted(expected.items())}).encode())
    folder = cache_dir("evals") / f"data-{key.hexdigest()[:16]}"
    if _matches(folder, expected):
        return folder
    if folder.exists() or folder.is_symlink():
        trash = folder.parent / f".trash-{owner_tag()}-{time.monotonic_ns()}-{folder.name}"
        try:
            os.rename(folder, trash)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        except OSError:
            pass  # another process replaced it meanwhile: checked again below
    with atomic_dir(folder) as tmp:
        for name, data in expected.items():
            (tmp / name).write_bytes(data)
    if not _matches(folder, expected):
        raise RuntimeError(f"the derived evaluation files in {folder} keep changing while they are used")
    return folder


def local_task_configs(data_dir: Path, *, word_pages: int | None, triviaqa_limit: int | None) -> dict[str, dict[str, Any]]:
    """lm-eval task configurations (name -> dict) of the local tasks, over verified data files.

    Built from the packaged templates with the safe YAML loader; the WikiText task's hooks are
    lm-eval's own ``wikitext_detokenizer`` and ``process_results`` (what its ``wikitext`` task uses).
    """
    import yaml
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    folder = local_task_dir(data_dir, word_pages=word_pages, triviaqa_limit=triviaqa_limit)
    configs = {}
    for template in sorted(TASK_TEMPLATES.glob("*.yaml.in")):
        text = template.read_text(encoding="utf-8")
        for mark, name in _FILLS.items():
            text = text.replace(mark, str(folder / name))
        config = yaml.safe_load(text)
        if config["task"] == LOCAL_TASKS["wikitext"]:
            config["doc_to_target"] = wikitext_detokenizer
            config["process_results"] = process_results
        configs[config["task"]] = config
    return configs


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
    from lm_eval.tasks import TaskManager

    from slmsearch.evals.prefix_lm import ProgressHFLM, ProgressPrefixCachedHFLM

    if data_dir is not None:
        configs = local_task_configs(data_dir, word_pages=word_pages, triviaqa_limit=limit)
        manager = TaskManager(include_defaults=False)
        names = [configs[LOCAL_TASKS[t]] for t in tasks]
        task_limit = None  # the derived files already hold exactly the scored rows
    else:
        manager = TaskManager()
        names = list(tasks)  # type: ignore[assignment]
        task_limit = limit
    device = str(next(model.parameters()).device)
    lm_class = ProgressPrefixCachedHFLM if prefix_cache else ProgressHFLM  # with "[lm-eval] ..." lines
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
