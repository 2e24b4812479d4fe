"""Command line: each command parses its flags, calls one library function, prints the result.

A :class:`~slmsearch.errors.SlmsearchError`, or a full disk, becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from slmsearch.errors import SlmsearchError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn a SlmsearchError, or a full disk, into ``error: <message>`` and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SlmsearchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))  # 2; 130 for an interrupted study
        except Exception as exc:
            detail = out_of_space(exc)
            if detail is None:
                raise
            click.echo(
                f"error: no space left on device ({detail}); free space, or point SLMSEARCH_CACHE (stage "
                "cache) and SLMSEARCH_RUNS (studies) at a larger disk, then re-run the same command to resume",
                err=True,
            )
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def out_of_space(exc: BaseException) -> str | None:
    """The first line of ``exc`` (or of an exception it was raised from) if it reports a full disk
    or quota: an OSError with ENOSPC/EDQUOT, or a library's own error that says so in its text
    (safetensors raises ``SafetensorError: ... No space left on device (os error 28)``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = (str(current).strip().splitlines() or [type(current).__name__])[0]
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return text[:200]
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return text[:200]
        current = current.__cause__ or current.__context__
    return None


class _Group(click.Group):
    """The command group, whose usage errors (a bad flag value, a missing option) are one
    ``error:`` line and exit code 2 like every other bad input, instead of click's usage block."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `slmsearch`: the help, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            where = f" (see `{exc.ctx.command_path} --help`)" if isinstance(exc, click.UsageError) and exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Group)
@click.version_option(package_name="slmsearch")
def main() -> None:
    """Hardware-aware compression search for small LLaMA-family models."""
    from slmsearch.interrupt import terminate_cleanly
    from slmsearch.quiet import quiet_third_party

    quiet_third_party()  # torchao's and torch's import-time log lines (slmsearch/quiet.py)

    terminate_cleanly()  # SIGTERM: this process's temporary folders removed, exit 143


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
# Each evaluation option defaults to the exported folder's own setting (its trial.json, so that the
# model card's numbers are reproduced), else to the value in brackets (evals/command.py DEFAULTS).
@click.option("--tasks", default=None, help="Comma list of: wikitext, triviaqa [export's metrics, else wikitext,triviaqa].")
@click.option("--metrics", default=None, help="Comma list of metric names (default: all of the chosen tasks').")
@click.option("--seqlen", type=int, default=None, help="Window length of wikitext_token_ppl [export's, else 512].")
@click.option("--windows", default=None, help="Token-ppl windows, 'all' for the whole test split [export's, else 8].")
@click.option("--pages", default=None, help="WikiText pages for word ppl, 'all' for 62 [export's, else 4].")
@click.option("--max-length", default=None, help="lm-eval rolling window, 'model' for its maximum [export's, else 2048].")
@click.option("--limit", default=None, help="TriviaQA questions, 'all' for 1,900 [export's, else 100].")
@click.option("--shots", type=int, default=None, help="TriviaQA few-shot examples [export's, else 5].")
@click.option("--batch-size", type=int, default=None, help="Sequences per forward pass [export's, else 8].")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--out", "out_path", default="eval.json", show_default=True, help="JSON file to write.")
@user_errors
def eval_cmd(
    model: str | None, trust_remote_code: bool, data_dir: str | None, tasks: str | None, metrics: str | None,
    seqlen: int | None, windows: str | None, pages: str | None, max_length: str | None, limit: str | None,
    shots: int | None, batch_size: int | None, dtype: str, out_path: str,
) -> None:
    """Score a model: WikiText perplexities and TriviaQA (table + JSON). On an exported folder, with
    the study's evaluation settings unless a flag says otherwise."""
    from slmsearch.evals.command import run_eval
    from slmsearch.outputs import check_output_file

    check_output_file(out_path)  # before the model is loaded
    result = run_eval(
        model=model, trust_remote_code=trust_remote_code, data_dir=data_dir, tasks=tasks, metrics=metrics,
        seqlen=seqlen, windows=windows, pages=pages, max_length=max_length, limit=limit, shots=shots,
        batch_size=batch_size, dtype=dtype, out_path=out_path,
    )
    click.echo(result["table"])
    click.echo(f"wrote {out_path}")


@main.command("optimize")
@click.option("--budget-mb", type=float, default=None, help="Deployed footprint limit in MB (1e6 bytes); default: the study file's.")
@click.option("--study", "study_file", default=None, metavar="YAML|NAME", help="Study file or a name in studies/ (default: studies/default.yaml).")
@click.option("--study-name", default=None, help="Name of the study in the storage (default: the file's).")
@click.option("--trials", type=int, default=None, help="Evaluated trials to reach (budget rejections are extra).")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Time limit in seconds: a trial that this machine's clock predicts cannot end within it is not started.")
@click.option("--storage", default=None, help="Optuna storage URL (default sqlite:///runs/<study>.db; postgresql://... for many workers).")
@click.option("--sampler", type=click.Choice(["nsga2", "tpe", "random"]), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--model", default=None, metavar="PATH|HUB_ID", help="LLaMA-architecture checkpoint (default: SmolLM2-135M-Instruct).")
@click.option("--platform", default=None, metavar="NAME|YAML", help="Hardware platform (default: siracusa).")
@_data_option
@click.option("--trust-remote-code", is_flag=True, default=None)
@user_errors
def optimize_cmd(
    budget_mb: float | None, study_file: str | None, study_name: str | None, trials: int | None,
    timeout_s: float | None, storage: str | None, sampler: str | None, seed: int | None,
    model: str | None, platform: str | None, data_dir: str | None, trust_remote_code: bool | None,
) -> None:
    """Search compression plans under a memory budget (resumes an existing study)."""
    import json

    from slmsearch.search.config import load_study_config, with_overrides
    from slmsearch.search.study import optimize_located

    config = with_overrides(
        load_study_config(study_file), budget_mb=budget_mb, name=study_name, trials=trials, timeout_s=timeout_s,
        storage=storage, sampler=sampler, seed=seed, model=model, platform=platform, data_dir=data_dir,
        trust_remote_code=trust_remote_code,
    )
    summary, located = optimize_located(config, log=lambda m: click.echo(m, err=True))  # one storage handle
    summary.pop("stage_calls", None)
    click.echo(json.dumps(summary, indent=2))
    from slmsearch.search.pareto import pareto_table

    click.echo(f"\nPareto set of {config.name!r} (feasible, non-dominated):", err=True)
    click.echo(pareto_table(located, "md") if summary["pareto"] else "(empty: no feasible trial evaluated yet)")
    click.echo("next: slmsearch report | slmsearch dashboard | slmsearch export --pareto  (same --study/--storage)", err=True)


@main.command("hw")
@click.option("--model", default=None, metavar="PATH|HUB_ID", help="Checkpoint whose shape to use (default: SmolLM2-135M).")
@click.option("--plan", "plan_file", default=None, metavar="YAML", help="Apply a compression plan's shape changes first.")
@click.option("--platform", default="siracusa", show_default=True, metavar="NAME|YAML")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a platform value, e.g. memory.l3.read_bw_bytes_per_cycle=2")
@click.option("--context", "context_len", default=512, show_default=True)
@click.option("--prefill", "prefill_len", default=0, show_default=True)
@click.option("--out", "out_path", default="hw.json", show_default=True)
@user_errors
def hw_cmd(model: str | None, plan_file: str | None, platform: str, overrides: tuple[str, ...],
           context_len: int, prefill_len: int, out_path: str) -> None:
    """Memory breakdown, placement, latency and energy on the hardware model."""
    from slmsearch.hwmodel.summary import format_report
    from slmsearch.search.hardware import write_hw_report

    parsed: dict[str, float] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        try:
            parsed[key.strip()] = float(value)
        except ValueError:
            raise SlmsearchError(f"--set needs KEY=NUMBER, got {item!r}") from None
        if not sep:
            raise SlmsearchError(f"--set needs KEY=NUMBER, got {item!r}")
    report = write_hw_report(out_path, model=model, plan_file=plan_file, platform=platform, overrides=parsed,
                             context_len=context_len, prefill_len=prefill_len)
    click.echo(format_report(report))
    click.echo(f"wrote {out_path}")


@main.command("hw-validate")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list (name, role, measured, model, error, source).")
@user_errors
def hw_validate_cmd(as_json: bool) -> None:
    """The hardware model against every published Siracusa measurement: fit rows, held-out rows,
    leave-one-out errors."""
    import json

    from slmsearch.hwmodel.validate import format_validation_table, leave_one_out, validation_table

    table = validation_table(loo=leave_one_out())
    click.echo(json.dumps(table, indent=1) if as_json else format_validation_table(table))


@main.command("compress")
@click.option("--plan", "plan_file", required=True, metavar="YAML|JSON", help="Compression plan (ordered stages).")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Folder for the checkpoint (must not exist).")
@_model_option
@_data_option
@user_errors
def compress_cmd(plan_file: str, out_dir: str, model: str | None, trust_remote_code: bool, data_dir: str | None) -> None:
    """Run a compression plan and write a loadable checkpoint with plan.json and stage reports."""
    from slmsearch.compress.pipeline import compress_to_dir

    result = compress_to_dir(plan_file, model, data_dir, out_dir)  # no data folder: one error line
    for report in result.reports:
        click.echo(f"{report.name:<10} {report.seconds:8.1f} s  {report.metrics}")
    click.echo(f"wrote {out_dir}")


# --- results: pareto, report, dashboard, export (read the study's storage; never write to it) ----


def _study_options(func: F) -> F:
    func = click.option("--study-name", default=None, help="Study name in the storage (default: the study file's, or the only one).")(func)
    func = click.option("--storage", default=None, help="Optuna storage URL (default: the study file's, sqlite:///runs/<study>.db).")(func)
    func = click.option("--study", "study_file", default=None, metavar="YAML|NAME", help="Study file or a name in studies/ (default: studies/default.yaml).")(func)
    return func


@main.command("pareto")
@_study_options
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
@user_errors
def pareto_cmd(study_file: str | None, storage: str | None, study_name: str | None, fmt: str) -> None:
    """List the feasible Pareto-optimal trials: plan, objectives, footprint, tokens/s, energy/token."""
    from slmsearch.search.pareto import pareto_table
    from slmsearch.search.storage import locate_study

    click.echo(pareto_table(locate_study(study_file, storage, study_name), fmt), nl=False)


@main.command("report")
@_study_options
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Folder for report.html, report.md and figures/.")
@user_errors
def report_cmd(study_file: str | None, storage: str | None, study_name: str | None, out_dir: str) -> None:
    """Write a self-contained HTML report (Pareto fronts, trials, importances, stage times) and a Markdown twin."""
    from slmsearch.outputs import check_output_folder
    from slmsearch.search.storage import locate_study
    from slmsearch.search.report import write_report

    check_output_folder(out_dir)
    report = write_report(locate_study(study_file, storage, study_name), out_dir)
    click.echo(f"wrote {report.html_path}")
    click.echo(f"wrote {report.md_path}")


@main.command("dashboard")
@_study_options
@click.option("--port", default=8080, show_default=True, help="Port on 127.0.0.1 (0 = any free port).")
@user_errors
def dashboard_cmd(study_file: str | None, storage: str | None, study_name: str | None, port: int) -> None:
    """Start optuna-dashboard on 127.0.0.1 over the study's storage and print its address."""
    from slmsearch.search.dashboard import serve
    from slmsearch.search.storage import locate_study

    serve(locate_study(study_file, storage, study_name), port=port, log=click.echo)


@main.command("export")
@_study_options
@click.option("--pareto", is_flag=True, help="Export every Pareto-optimal trial.")
@click.option("--trial", "numbers", type=int, multiple=True, metavar="N", help="Export trial N (repeatable).")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Folder that receives one trial-NNNN/ folder per trial.")
@_data_option
@click.option("--trust-remote-code", is_flag=True, default=False,
              help="Let the base model run its own code (never taken from the study's storage).")
@user_errors
def export_cmd(study_file: str | None, storage: str | None, study_name: str | None, pareto: bool,
               numbers: tuple[int, ...], out_dir: str, data_dir: str | None, trust_remote_code: bool) -> None:
    """Write each chosen trial's compressed checkpoint with a model card (rebuilt from the stage cache)."""
    from slmsearch.outputs import check_output_folder
    from slmsearch.search.export import export
    from slmsearch.search.storage import locate_study

    check_output_folder(out_dir)
    export(locate_study(study_file, storage, study_name), out_dir, pareto=pareto, numbers=numbers,
           data_dir=data_dir, log=click.echo, trust_remote_code=trust_remote_code)
