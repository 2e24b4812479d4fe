"""Command line: each command parses its flags, calls one library function, prints the result.

A :class:`~slmsearch.errors.SlmsearchError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from slmsearch.errors import SlmsearchError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn a SlmsearchError into ``error: <message>`` and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SlmsearchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="slmsearch")
def main() -> None:
    """Hardware-aware compression search for small LLaMA-family models."""


def _model_option(func: F) -> F:
    func = click.option(
        "--model", default=None, metavar="PATH|HUB_ID",
        help="LLaMA-architecture checkpoint: a local folder or a hub id (default: SmolLM2-135M-Instruct, offline).",
    )(func)
    func = click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code to run (off by default).")(func)
    return func


def _data_option(func: F) -> F:
    return click.option(
        "--data-dir", default=None, envvar="SLMSEARCH_DATA_DIR", metavar="DIR",
        help="Offline data folder (shared/data layout); default $SLMSEARCH_DATA_DIR; none: lm-eval hub tasks.",
    )(func)


@main.command("eval")
@_model_option
@_data_option
@click.option("--tasks", default="wikitext,triviaqa", show_default=True, help="Comma list of: wikitext, triviaqa.")
@click.option("--metrics", default=None, help="Comma list of metric names (default: all of the chosen tasks').")
@click.option("--seqlen", default=512, show_default=True, help="Window length of wikitext_token_ppl.")
@click.option("--windows", default="8", show_default=True, help="Token-ppl windows ('all' for the whole test split).")
@click.option("--pages", default="4", show_default=True, help="WikiText pages for word ppl ('all' for 62).")
@click.option("--max-length", default="2048", show_default=True, help="lm-eval rolling window ('model' for its maximum).")
@click.option("--limit", default="100", show_default=True, help="TriviaQA questions ('all' for 1,900).")
@click.option("--shots", default=5, show_default=True, help="TriviaQA few-shot examples.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--out", "out_path", default="eval.json", show_default=True, help="JSON file to write.")
@user_errors
def eval_cmd(
    model: str | None, trust_remote_code: bool, data_dir: str | None, tasks: str, metrics: str | None,
    seqlen: int, windows: str, pages: str, max_length: str, limit: str, shots: int, batch_size: int,
    dtype: str, out_path: str,
) -> None:
    """Score a model: WikiText perplexities and TriviaQA (table + JSON)."""
    from slmsearch.evals.report import run_eval

    result = run_eval(
        model=model, trust_remote_code=trust_remote_code, data_dir=data_dir, tasks=tasks, metrics=metrics,
        seqlen=seqlen, windows=windows, pages=pages, max_length=max_length, limit=limit, shots=shots,
        batch_size=batch_size, dtype=dtype, out_path=out_path,
    )
    click.echo(result["table"])
    click.echo(f"wrote {out_path}")
