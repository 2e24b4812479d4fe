"""Security posture, checked on the package's source (AST, so comments and docstrings don't count)
and on behaviour: no pickle anywhere (safetensors only), YAML through the safe loader, remote code
only when the user passes --trust-remote-code, the dashboard on loopback unless told otherwise."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

PACKAGE = Path(__file__).resolve().parents[1] / "slmsearch"
SOURCES = sorted(PACKAGE.rglob("*.py"))
PICKLING_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _name(node: ast.AST) -> str:
    """Dotted name of an attribute chain (``torch.load``), '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _findings(check) -> list[str]:
    out = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            message = check(node)
            if message:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}: {message}")
    return out


def test_sources_were_found():
    assert len(SOURCES) > 20 and PACKAGE / "models.py" in SOURCES


def test_no_torch_load_or_pickle():
    def check(node):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
            return f"imports {bad}" if bad else None
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            return f"imports from {node.module}"
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            return "imports torch.load"
        if isinstance(node, ast.Call) and _name(node.func) in ("torch.load", "torch.serialization.load", "numpy.load", "np.load"):
            return f"calls {_name(node.func)}"
        return None

    assert _findings(check) == []


def test_no_pickle_based_checkpoints_written_or_read():
    def check(node):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in ("safe_serialization", "use_safetensors") and isinstance(kw.value, ast.Constant) and kw.value.value is False:
                    return f"{kw.arg}=False"
                if kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is False:
                    return "weights_only=False"
        return None

    assert _findings(check) == []


def test_yaml_only_through_the_safe_loader():
    def check(node):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all", "yaml.full_load_all"):
                return f"calls {name}"
            if name == "yaml.load":
                loader = [kw.value for kw in node.keywords if kw.arg == "Loader"] + node.args[1:2]
                if not loader or _name(loader[0]) not in ("yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"):
                    return "yaml.load without SafeLoader"
        if isinstance(node, ast.ImportFrom) and node.module == "yaml" and any(
            a.name in ("load", "unsafe_load", "full_load", "Loader", "UnsafeLoader", "FullLoader") for a in node.names
        ):
            return "imports an unsafe yaml loader"
        return None

    assert _findings(check) == []


def test_remote_code_only_when_asked():
    def check(node):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and isinstance(node.value, ast.Constant) and node.value.value is True:
            return "trust_remote_code=True"
        return None

    assert _findings(check) == []
    from slmsearch.search.config import StudyConfig

    assert StudyConfig().trust_remote_code is False
    from slmsearch.cli import main

    for name in ("eval", "optimize", "compress"):
        options = {p.name: p for p in main.commands[name].params}
        if "trust_remote_code" in options:
            assert options["trust_remote_code"].default is not True and options["trust_remote_code"].is_flag, name


def test_dashboard_binds_to_loopback_by_default():
    import inspect

    from slmsearch.cli import main
    from slmsearch.search import dashboard

    assert dashboard.HOST == "127.0.0.1"
    assert inspect.signature(dashboard.check_port).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(dashboard.free_port).parameters["host"].default == "127.0.0.1"
    source = inspect.getsource(dashboard.serve)
    assert "host=HOST" in source and "0.0.0.0" not in inspect.getsource(dashboard)
    host_options = [p for p in main.commands["dashboard"].params if p.name == "host"]
    assert all(p.default == "127.0.0.1" for p in host_options)


def test_a_pickled_checkpoint_is_refused_unopened(tmp_path, tiny_checkpoint):
    """A folder with only pytorch_model.bin (a pickle whose loading would run code): one-line error,
    and the pickle never ran."""
    from slmsearch.cli import main

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_checkpoint / name).exists():
            (folder / name).write_bytes((tiny_checkpoint / name).read_bytes())
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    result = CliRunner().invoke(main, ["eval", "--model", str(folder), "--out", str(tmp_path / "e.json")])
    out = result.output.strip()
    assert result.exit_code == 2 and out.startswith("error:") and len(out.splitlines()) == 1, out
    assert "model.safetensors" in out
    assert not marker.exists() and not (tmp_path / "e.json").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("url", ["postgresql://alice:hunter2@db.example:5432/s", "mysql+pymysql://bob:hunter2@h/s?charset=utf8"])
def test_storage_passwords_never_printed(url):
    from slmsearch.search.storage import redact

    assert "hunter2" not in redact(url) and "***" in redact(url)


@pytest.mark.parametrize("password", ["pa%3Fss", "p%23ss", "p%40ss", "pa?ss", "p#ss", "hunter2"])
@pytest.mark.parametrize("template", ["postgresql://alice:{pw}@db.example:5432/s",
                                      "postgresql+psycopg2://alice:{pw}@db.example/s?sslmode=require",
                                      "mysql+pymysql://bob:{pw}@h/s?charset=utf8"])
def test_the_url_password_field_is_replaced_whatever_it_holds(password, template):
    from urllib.parse import unquote

    from slmsearch.search.storage import redact, scrub

    url = template.format(pw=password)
    shown = redact(url)
    assert "***" in shown and "db.example" in shown or "@h/" in shown
    assert password not in shown and unquote(password) not in shown.split("@", 1)[0]
    message = f"could not connect to {url}: password authentication failed (password={unquote(password)})"
    scrubbed = scrub(message, url)
    assert password not in scrubbed and f"password={unquote(password)}" not in scrubbed


def test_a_password_in_the_query_is_replaced():
    from slmsearch.search.storage import redact

    assert redact("postgresql://u@h/db?password=pa%3Fss&x=1") == "postgresql://u@h/db?password=***&x=1"


def test_a_short_password_is_not_starred_inside_words():
    from slmsearch.search.storage import scrub

    url = "postgresql://alice:im@h/db"
    out = scrub(f"cannot import the driver for {url}; simple", url)
    assert out == "cannot import the driver for postgresql://alice:***@h/db; simple"


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 200, "a b", "a\\b", "..", "/abs"])
def test_a_study_name_that_is_not_a_file_name_is_one_error_line(tmp_path, monkeypatch, name):
    from slmsearch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))
    result = CliRunner().invoke(main, ["optimize", "--study-name", name, "--data-dir", str(tmp_path)])
    out = result.output.strip()
    assert result.exit_code == 2 and out.startswith("error:") and len(out.splitlines()) == 1, out
    assert "study name" in out or "--study-name" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside or outside runs/


@pytest.mark.parametrize("name", ["my-study_2", "smollm2-135m-siracusa", "a.b"])
def test_a_file_name_is_a_study_name(name):
    from slmsearch.search.storage import check_study_name

    assert check_study_name(name) == name


def test_files_and_folders_are_written_with_the_users_umask(tmp_path):
    from slmsearch.compress.cache import MANIFEST, StageCache
    from slmsearch.fsutil import atomic_dir, write_json_atomic

    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("x")
        entry = StageCache(tmp_path / "stages").put("k", lambda d: (d / "w.bin").write_bytes(b"x"))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
        assert (entry / MANIFEST).stat().st_mode & 0o777 == 0o644 and entry.stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600  # a private umask stays private
    finally:
        os.umask(previous)


def test_cached_depth_scores_are_recomputed_after_a_planted_change(tmp_path):
    from slmsearch.fsutil import read_json_checked, write_json_checked

    path = tmp_path / "depth-scores.json"
    write_json_checked(path, {"version": 1, "angular": {"1": [0.1, 0.9]}})
    assert read_json_checked(path) == {"version": 1, "angular": {"1": [0.1, 0.9]}}
    path.write_text(path.read_text().replace("0.9", "0.0"))  # make layer 1 look redundant
    assert read_json_checked(path) is None and not path.exists()
