"""The layout's rules, checked rather than remembered (../shared/ARCHITECTURE.md).

Import boundaries are import-linter contracts in pyproject.toml; what import-linter cannot
see (printing, private names across modules, file and function sizes) is checked here from
the source's syntax trees.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PKG = ROOT / "pilotflow"
SOURCES = sorted(p for p in PKG.rglob("*.py"))
# the launcher is a program of its own (its helpers answer on stdout) and stays one file
ALONE = {PKG / "launcher.py"}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports (import-linter) is not installed: pip install -e '.[test]'")
    p = subprocess.run([exe, str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 broken" in p.stdout, p.stdout


def test_nothing_outside_the_cli_prints():
    offenders = []
    for path in SOURCES:
        if PKG / "cli" in path.parents or path in ALONE:
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{_rel(path)}:{node.lineno}: print()")
            if (isinstance(node, ast.Attribute) and node.attr in ("write", "writelines")
                    and isinstance(node.value, ast.Attribute) and node.value.attr in ("stdout", "stderr")
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                offenders.append(f"{_rel(path)}:{node.lineno}: sys.{node.value.attr}.{node.attr}")
    assert not offenders, "only pilotflow/cli may print:\n" + "\n".join(offenders)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for path in SOURCES:
        tree = _tree(path)
        aliases: dict[str, str] = {}  # local name → pilotflow module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pilotflow"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{_rel(path)}:{node.lineno}: from {node.module} import {a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("pilotflow"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                offenders.append(f"{_rel(path)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


def test_files_and_functions_stay_small():
    big = []
    for path in SOURCES:
        if path in ALONE:
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            big.append(f"{_rel(path)}: {n} lines (> {MAX_FILE_LINES})")
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{_rel(path)}:{node.lineno}: {node.name}() is {length} lines (> {MAX_FUNCTION_LINES})")
    assert not big, "split these:\n" + "\n".join(big)


def test_the_scheduler_registry_lists_every_backend_and_the_launcher_names_none():
    from pilotflow.schedulers import backend_class, names
    assert set(names()) == {"local", "pbs", "sge", "slurm"}
    for name in names():
        cls = backend_class(name)
        assert cls.name == name and (PKG / "templates" / cls.template).is_file()
        assert cls.check_commands and cls.walltime_step >= 1
    source = (PKG / "launcher.py").read_text().lower()
    for name in ("slurm", "sge", "pbs"):
        assert f'"{name}"' not in source, f"the launcher branches on the scheduler name {name!r}"
