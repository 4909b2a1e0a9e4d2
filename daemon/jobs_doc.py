"""The settings table of docs/job-format.md, generated from `daemon.jobs.SETTINGS`.

    .venv/bin/python -m daemon.jobs_doc            # rewrite the table in docs/job-format.md
    .venv/bin/python -m daemon.jobs_doc --check    # exit 1 if the file is out of date

Only the lines between `BEGIN` and `END` are generated; the rest of the file is written by hand.
A test (tests/daemon/test_settings_table.py) checks the file is up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from daemon.jobs import SETTING_BY_NAME, SETTINGS, Setting

DOC = Path(__file__).resolve().parents[1] / "docs" / "job-format.md"
BEGIN = (
    "<!-- settings: generated from daemon/jobs.py SETTINGS by `python -m daemon.jobs_doc`; "
    "do not edit by hand -->"
)
END = "<!-- end of the generated settings -->"


def _num(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e6 or not float(x).is_integer() else str(int(x))


def allowed(s: Setting) -> str:
    """What a job may give: the type with its range or choices, `null` when optional."""
    if s.kind is bool:
        text = "true/false"
    elif s.kind in (int, float):
        word = "int" if s.kind is int else "number"
        text = f"{word} {_num(s.lo or 0)}..{_num(s.hi)}" if s.hi is not None else word
    elif s.choices:
        text = " \\| ".join(f"`{c}`" for c in s.choices)
    else:
        text = "string"
    if s.check is not None and s.check.__doc__:
        text += f", {s.check.__doc__.strip()}"
    return text + (" or `null`" if s.optional else "")


def shown(value: Any) -> str:
    """A default as the table shows it: unset, true/false, 2, `streaming`."""
    if value is None or isinstance(value, bool):
        return "unset" if value is None else str(value).lower()
    if isinstance(value, str):
        return f"`{value}`"
    return _num(value) if isinstance(value, float) else str(value)


def dedupe_text(s: Setting) -> str:
    if s.dedupe == "when_on":
        switch = SETTING_BY_NAME[s.switch] if s.switch else s
        return f"while `{switch.name}` is on" if switch.kind is bool else f"when not {shown(s.default)}"
    return "yes" if s.dedupe == "always" else "no"


def render_settings_table() -> str:
    """The generated block, markers included."""
    lines = [
        BEGIN,
        "",
        "| key | allowed | default | in the duplicate check | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        lines.append(f"| `{s.name}` | {allowed(s)} | {shown(s.default)} | {dedupe_text(s)} | {s.doc} |")
    return "\n".join([*lines, "", END])


def updated(text: str) -> str:
    """`text` (docs/job-format.md) with its generated block replaced by the current one."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + render_settings_table() + text[end:]


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    fresh = updated(text)
    if "--check" in argv:
        if fresh != text:
            print(f"{DOC} is out of date: run python -m daemon.jobs_doc", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
