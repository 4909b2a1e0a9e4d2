"""The docs say what the code does: every error code the docs name exists in the code and every
code the code can give is documented; no made-up `E_XXX` codes; what the dashboard's JSON shows
of server paths is what docs/dashboard.md says; the config docs and docs/weights.md agree on
the defaults they both name."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import ERROR_CODES
from dashboard.views import job_view

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
CODE = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)*)`")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    level = heading.split(" ")[0]
    rest = text[start + len(heading) :]
    ends = [m.start() for m in re.finditer(rf"^#{{2,{len(level)}}} ", rest, re.M)]
    return rest[: ends[0]] if ends else rest


def _first_column_codes(section: str) -> set[str]:
    codes: set[str] = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            codes |= set(CODE.findall(first))
    return codes - {"code"}


def documented_codes() -> set[str]:
    daemon_md = _section((ROOT / "docs" / "daemon.md").read_text(), "### Error codes")
    job_md = _section((ROOT / "docs" / "job-format.md").read_text(), "## Errors")
    config_keys = {f for f in Settings.__dataclass_fields__}
    prose = daemon_md.split("|", 1)[0]  # the paragraph listing the job JSON's codes
    return (
        _first_column_codes(daemon_md)
        | _first_column_codes(job_md)
        | {c for c in CODE.findall(prose) if c not in config_keys}
    )


def _constants(node: ast.AST | None) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _constants(node.body) + _constants(node.orelse)
    if isinstance(node, ast.Tuple) and node.elts:  # (code, message)
        return _constants(node.elts[0])
    return []


#: calls whose argument at this position is an error code
CODE_ARG = {
    "JobError": 0,
    "JobRejected": 0,
    "BadBundle": 0,
    "single": 0,
    "_fail": 1,
    "_failed": 1,
    "_fail_later": 1,
}


def codes_in_code() -> dict[str, str]:
    """Every error code the daemon's source gives a job (code -> where), found in the AST: the
    code arguments of the error classes and the failure helpers, `code=`/`error_code=`
    keywords, `c.add(code, field, message)`, `code, why = (...)` and `classify`'s returns."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "daemon").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            values: list[str] = []
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                pos = CODE_ARG.get(name)
                if name == "add" and len(node.args) >= 3:
                    pos = 0
                if pos is not None and len(node.args) > pos:
                    values += _constants(node.args[pos])
                values += [
                    c
                    for kw in node.keywords
                    if kw.arg in ("code", "error_code")
                    for c in _constants(kw.value)
                ]
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
                first = node.targets[0].elts[0]
                if isinstance(first, ast.Name) and first.id == "code":
                    values += _constants(node.value)
            elif isinstance(node, ast.FunctionDef) and node.name == "classify":
                values += [
                    c for r in ast.walk(node) if isinstance(r, ast.Return) for c in _constants(r.value)
                ]
            for value in values:
                found.setdefault(value, f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}")
    return found


def test_the_scan_finds_codes_of_every_kind() -> None:
    """Guards the scanner itself: one code of each way the source gives one."""
    found = codes_in_code()
    for code in (
        "unknown_key",
        "bad_json",
        "too_deep",
        "duplicate",
        "cuda_oom",
        "worker_stall",
        "attempts_exhausted",
        "cancelled",
    ):
        assert code in found, code


def test_every_code_the_daemon_gives_is_registered_and_documented() -> None:
    found = codes_in_code()
    unregistered = {c: where for c, where in found.items() if c not in ERROR_CODES}
    assert not unregistered, f"add these to daemon.errors.ERROR_CODES and the docs: {unregistered}"
    undocumented = ERROR_CODES - documented_codes()
    assert not undocumented, (
        f"not in docs/daemon.md 'Error codes' or docs/job-format.md 'Errors': {undocumented}"
    )


def test_every_documented_code_exists_in_the_code() -> None:
    documented = documented_codes()
    assert documented - ERROR_CODES == set(), "documented but no such code"
    source = "\n".join(p.read_text() for p in (ROOT / "daemon").glob("*.py") if p.name != "errors.py")
    unused = {c for c in ERROR_CODES if f'"{c}"' not in source}
    assert not unused, f"registered in ERROR_CODES but never given by the daemon: {unused}"


def test_no_doc_names_an_upper_case_error_code() -> None:
    """Codes are lower case (`cuda_oom`); an `E_OOM` in a doc names nothing."""
    for path in DOCS:
        bad = re.findall(r"\bE_[A-Z0-9_]+\b", path.read_text())
        assert not bad, f"{path.name}: {bad}"


def test_error_json_examples_use_real_codes() -> None:
    for path in DOCS:
        for code in re.findall(r'"(?:error_)?code": "([^"]+)"', path.read_text()):
            assert code in ERROR_CODES or code == "<code>", f"{path.name}: {code}"


def test_systemd_doc_names_no_fixed_logging_gap() -> None:
    """The render worker logs with the journal prefixes (daemon/runner.py configures its logging
    with tag="worker"); the doc no longer calls that a gap."""
    text = (ROOT / "docs" / "systemd.md").read_text()
    assert "Known gap" not in text
    runner = (ROOT / "daemon" / "runner.py").read_text()
    assert 'configure_logging(config.log_level, tag="worker")' in runner


# ---------------------------------------------------------------------- server paths


def test_dashboard_json_shows_output_names_and_the_documented_server_paths(tmp_path: Path) -> None:
    """docs/dashboard.md: outputs by file name only, no claimed-inputs folder; `source`,
    `originals` and error messages keep their server paths (on purpose, for the operator)."""
    outbox, inbox = tmp_path / "outbox", tmp_path / "inbox"
    row: dict[str, Any] = {
        "id": "0123456789ab",
        "name": "alice",
        "state": "failed",
        "source": str(inbox / "alice"),
        "originals": str(outbox / "failed" / "alice"),
        "job_dir": str(tmp_path / "var" / "jobs" / "0123456789ab"),
        "output_json": str(outbox / "alice.json"),
        "output_video": str(outbox / "alice.mp4"),
        "error_code": "bad_media",
        "error_message": f"{inbox}/alice/voice.wav does not decode",
        "failure_detail": '{"traceback": "..."}',
    }
    view = job_view(row, now=0.0)
    assert view["outputs"] == {"json": "alice.json", "video": "alice.mp4"}
    assert "job_dir" not in view and "failure_detail" not in view
    assert "output_video" not in view and "output_json" not in view
    assert view["source"] == str(inbox / "alice") and view["originals"] == str(outbox / "failed" / "alice")
    assert str(inbox) in view["error_message"]
    text = (ROOT / "docs" / "dashboard.md").read_text()
    assert "never shows server paths" not in text
    security = _section(text, "## Security")
    for field in ("`outputs`", "`job_dir`", "`source`", "`originals`", "error messages"):
        assert field in security, field


# ---------------------------------------------------------------------- defaults


def test_weights_doc_states_the_config_defaults() -> None:
    text = (ROOT / "docs" / "weights.md").read_text()
    s = Settings()
    assert s.lora == () and 'lora = "auto"' not in text
    assert s.performance.rope == "fast" and '`rope`: `"fast"` (default' in text
    assert s.attention == "auto" and '`attention`: `"auto"` (default' in text
    assert "- `attention_backend`:" not in text  # the config key is `attention`
