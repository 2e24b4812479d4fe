"""The house's one-way arrows (docs/architecture.md), checked on the source and at run time.

Static: every ``import`` statement in a room, at module level or inside a function, is read from
the source's syntax tree, so a lazy import breaks a rule as surely as a top-level one.
Run time: importing the light rooms in a fresh interpreter leaves torch unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slmsearch"
HEAVY = ("torch", "transformers", "peft", "gptqmodel", "lm_eval", "optuna")

# room (a folder or a module under slmsearch/) -> module prefixes it must never import
RULES: dict[str, tuple[str, ...]] = {
    "hwmodel": HEAVY + ("slmsearch.compress", "slmsearch.search", "slmsearch.evals", "slmsearch.cli", "slmsearch.models"),
    "compress": ("slmsearch.search", "slmsearch.cli"),
    "evals": ("slmsearch.search", "slmsearch.cli", "slmsearch.compress"),
    "checkpoint.py": ("slmsearch.search", "slmsearch.cli", "slmsearch.evals"),
    "errors.py": HEAVY + ("slmsearch.",),
}


def imported_modules(source: str, module: str) -> list[str]:
    """Every module an ``import`` / ``from ... import`` in ``source`` names (relative ones resolved
    against ``module``, the dotted name of the file)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out.extend(f"{name}.{alias.name}" for alias in node.names)
    return out


def violations(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for name in imported_modules(source, module):
        for prefix in forbidden:
            if name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + "."):
                bad.append(name)
    return sorted(set(bad))


def room_files(room: str) -> list[Path]:
    path = PACKAGE / room
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("room", sorted(RULES))
def test_room_imports_only_what_its_rule_allows(room):
    found = {}
    for path in room_files(room):
        bad = violations(path.read_text(encoding="utf-8"), module_name(path), RULES[room])
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert not found, f"forbidden imports in {room}: {found}"


def test_only_the_entry_points_import_the_cli():
    users = [
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if p.name not in ("cli.py", "__main__.py")
        and violations(p.read_text(encoding="utf-8"), module_name(p), ("slmsearch.cli",))
    ]
    assert users == []


@pytest.mark.parametrize("source, module, expected", [
    ("import torch\n", "slmsearch.hwmodel.x", ["torch"]),
    ("def f():\n    import torch.nn as nn\n", "slmsearch.hwmodel.x", ["torch.nn"]),
    ("from slmsearch.compress.plan import Plan\n", "slmsearch.hwmodel.x", ["slmsearch.compress.plan", "slmsearch.compress.plan.Plan"]),
    ("from ..compress import wanda\n", "slmsearch.hwmodel.x", ["slmsearch.compress", "slmsearch.compress.wanda"]),
    ("from slmsearch import compress\n", "slmsearch.hwmodel.x", ["slmsearch.compress"]),
    ("import torchvision\nfrom slmsearch.compressed import x\n", "slmsearch.hwmodel.x", []),
])
def test_the_checker_sees_every_form_of_import(source, module, expected):
    assert violations(source, module, RULES["hwmodel"]) == expected


@pytest.mark.parametrize("module", ["slmsearch.hwmodel", "slmsearch.search.space", "slmsearch.search.config",
                                    "slmsearch.checkpoint", "slmsearch.compress.plan"])
def test_light_modules_do_not_load_torch(module):
    code = f"import sys, {module}; heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})); print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing {module} loaded {out}"
