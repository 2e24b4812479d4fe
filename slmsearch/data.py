"""The offline data files: where they are, that they are intact, and what is read from them.

Evaluation reads the WikiText-2 *test* split and the TriviaQA questions; calibration and LoRA
training read only ``wiki.valid.tokens`` (see ``../shared/data/README.md``). Nothing is ever
written into the data folder: derived files go to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError

ENV_DATA_DIR = "SLMSEARCH_DATA_DIR"


@dataclass(frozen=True)
class DataFile:
    """One file of the data folder, with the sha256 published in its README."""

    relpath: str
    sha256: str
    rows: int


# Hashes and row counts from shared/data/README.md (its provenance table).
FILES: dict[str, DataFile] = {
    "wikitext_test_raw": DataFile(
        "wikitext-2/wiki.test.raw",
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        4358,
    ),
    "wikitext_test_pages": DataFile(
        "wikitext-2/wiki.test.pages.jsonl",
        "85f09ca4c886eb81390d60d2318c4e9dab62e290c0e05425c97ce7790be559de",
        62,
    ),
    "wikitext_valid_tokens": DataFile(
        "wikitext-2/wiki.valid.tokens",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        3760,
    ),
    "triviaqa_dev": DataFile(
        "triviaqa/triviaqa_dev_2000.jsonl",
        "de2c9835f841dcd4c060e7adaa374b3fbdee4def84075b2f70af19a84d29c0fe",
        2000,
    ),
}

# The last questions of the TriviaQA file are the few-shot pool: never scored.
TRIVIAQA_FEWSHOT_POOL = 100


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The data folder from the argument, else ``$SLMSEARCH_DATA_DIR``, else None (hub tasks)."""
    raw = data_dir if data_dir not in (None, "") else os.environ.get(ENV_DATA_DIR) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise SlmsearchError(
            f"data dir {str(path)!r} does not exist; pass --data-dir pointing at the folder "
            "described in shared/data/README.md, or unset SLMSEARCH_DATA_DIR"
        )
    return path.resolve()


@lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_path(data_dir: Path, key: str) -> Path:
    """Path of one known data file, after checking that it exists and its sha256 matches."""
    if key not in FILES:
        raise SlmsearchError(f"unknown data file {key!r}; known: {', '.join(sorted(FILES))}")
    spec = FILES[key]
    path = data_dir / spec.relpath
    if not path.is_file():
        raise SlmsearchError(
            f"data file {str(path)!r} is missing; --data-dir must hold {spec.relpath} "
            "(see shared/data/README.md)"
        )
    stat = path.stat()
    actual = _sha256(path, stat.st_size, stat.st_mtime_ns)
    if actual != spec.sha256:
        raise SlmsearchError(
            f"data file {str(path)!r} has sha256 {actual[:12]}..., expected {spec.sha256[:12]}...; "
            "replace it with the published file (see shared/data/README.md)"
        )
    return path


def data_hashes(data_dir: Path | None) -> dict[str, str]:
    """The verified sha256 of every data file (for run records and model cards)."""
    if data_dir is None:
        return {}
    return {key: FILES[key].sha256 for key in FILES if data_path(data_dir, key)}


def wikitext_test_text(data_dir: Path) -> str:
    """The test split as the GPTQ/WANDA papers build it: ``"\\n\\n".join`` of the dataset rows.

    The rows are the raw file's lines, newline kept, with whitespace-only lines emptied, as the
    Hugging Face ``wikitext-2-raw-v1`` builder yields them.
    """
    raw = data_path(data_dir, "wikitext_test_raw").read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def wikitext_valid_text(data_dir: Path) -> str:
    """The validation split (tokenized release): the only text calibration and LoRA may read."""
    return data_path(data_dir, "wikitext_valid_tokens").read_text(encoding="utf-8")


def triviaqa_rows(data_dir: Path) -> list[dict[str, Any]]:
    """All TriviaQA rows ``{"context", "answer", "aliases"}`` in file order."""
    path = data_path(data_dir, "triviaqa_dev")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def triviaqa_split(data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scored questions, few-shot pool): the pool is the file's last rows and is never scored."""
    rows = triviaqa_rows(data_dir)
    return rows[:-TRIVIAQA_FEWSHOT_POOL], rows[-TRIVIAQA_FEWSHOT_POOL:]


def tokenizer_key(tokenizer: Any) -> str:
    """A content key of a tokenizer: the same tokenizer files loaded twice (every trial loads its
    checkpoint's copy) give the same key, so a text is tokenized once per process."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: per object (the cache entry keeps it alive)
        return f"object:{id(tokenizer)}"
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(repr(sorted(getattr(tokenizer, "special_tokens_map", {}).items())).encode())
    return digest.hexdigest()


_SPLIT_TEXT = {"test": wikitext_test_text, "valid": wikitext_valid_text}
_TOKEN_IDS: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()  # at most 4, LRU


def wikitext_ids(split: str, data_dir: Path, tokenizer: Any) -> Any:
    """The token ids (LongTensor [n]) of a WikiText split, ``"test"`` or ``"valid"``, tokenized
    once per process for each tokenizer content (``tokenizer_key``), not per tokenizer object."""
    import torch

    key = (split, str(data_dir), tokenizer_key(tokenizer))
    if key in _TOKEN_IDS:
        _TOKEN_IDS.move_to_end(key)
        return _TOKEN_IDS[key][0]
    ids = tokenizer(_SPLIT_TEXT[split](data_dir), return_tensors="pt").input_ids[0].to(torch.long)
    _TOKEN_IDS[key] = (ids, tokenizer)  # the tokenizer is kept alive: an "object:" key stays unique
    while len(_TOKEN_IDS) > 4:
        _TOKEN_IDS.popitem(last=False)
    return ids


def calibration_tokens(
    tokenizer: Any,
    data_dir: Path,
    *,
    n_samples: int,
    seqlen: int,
    seed: int,
    part: str = "train",
) -> Any:
    """``n_samples`` windows of ``seqlen`` tokens from ``wiki.valid.tokens``, at seeded offsets.

    The validation text is tokenized once per process. ``part="train"`` samples from its first
    90% (calibration, LoRA steps); ``part="heldout"`` from the last 10% (LoRA held-out loss), so
    the two never overlap and neither touches the test split.
    """
    import torch

    if n_samples < 1 or seqlen < 2:
        raise SlmsearchError(
            f"calibration needs n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}"
        )
    ids = wikitext_ids("valid", data_dir, tokenizer)
    cut = int(ids.numel() * 0.9)
    if part == "train":
        span = ids[:cut]
    elif part == "heldout":
        span = ids[cut:]
    else:
        raise SlmsearchError(f"calibration part must be 'train' or 'heldout', got {part!r}")
    if span.numel() <= seqlen:
        raise SlmsearchError(f"calibration seqlen {seqlen} exceeds the {span.numel()} tokens available")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, span.numel() - seqlen, (n_samples,), generator=generator)
    return torch.stack([span[s : s + seqlen] for s in starts.tolist()])
