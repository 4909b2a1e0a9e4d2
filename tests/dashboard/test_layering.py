"""The dashboard never imports torch, and its CLI module imports only the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["dashboard.app", "dashboard.server", "daemon.cli"])
def test_importing_the_dashboard_does_not_import_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in ('torch', 'pipeline', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_dashboard_sources_never_name_torch_or_the_pipeline() -> None:
    for path in (ROOT / "dashboard").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"torch", "pipeline"}, f"{path.name} imports {name}"


def test_cli_module_imports_only_the_standard_library_at_module_level() -> None:
    tree = ast.parse((ROOT / "dashboard" / "server.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
