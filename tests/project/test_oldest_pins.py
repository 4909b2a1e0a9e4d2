"""scripts/test-oldest tests the floors pyproject.toml declares for transformers and tokenizers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_oldest_job_pins_the_declared_floors() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([a-z-]+)>=([\d.]+)", d).groups() for d in deps if ">=" in d)  # type: ignore[union-attr]
    script = (ROOT / "scripts" / "test-oldest").read_text()
    pins = dict(re.findall(r"^(TRANSFORMERS|TOKENIZERS)=([\d.]+)$", script, re.M))
    assert pins["TRANSFORMERS"].removesuffix(".0") == floors["transformers"].removesuffix(".0")
    assert pins["TOKENIZERS"].removesuffix(".0") == floors["tokenizers"].removesuffix(".0")


def test_ci_runs_the_oldest_job_after_the_suite() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines.index("scripts/test-oldest") > lines.index("scripts/test")
