"""Every read of a media file goes through pipeline.av_input.open_input (tags that are not UTF-8
never fail it, on every PyAV version pyproject.toml allows)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _av_open_calls_for_reading(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if not (
            node.func.attr == "open" and isinstance(node.func.value, ast.Name) and node.func.value.id == "av"
        ):
            continue
        modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
        modes += [
            k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
        ]
        if "w" not in modes:
            lines.append(node.lineno)
    return lines


def test_no_module_opens_media_for_reading_around_open_input() -> None:
    found = {}
    for package in ("daemon", "pipeline", "dashboard", "tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "av_input.py":
                continue
            if lines := _av_open_calls_for_reading(path):
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}, f"av.open(...) for reading outside pipeline/av_input.py: {found}"
