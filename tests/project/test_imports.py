"""Layering rules of the architecture (spec/style.md 4.3), checked in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_pipeline_imports_neither_daemon_nor_dashboard() -> None:
    imported = _imported_modules("pipeline")
    assert not imported & {"daemon", "dashboard"}, imported & {"daemon", "dashboard"}


@pytest.mark.parametrize("module", ["dashboard.app", "daemon.cli", "daemon.ledger", "daemon.jobs"])
def test_light_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported by {module}'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
