"""Every number in the config is finite and inside its documented range (issue 13, item 11).

The cases are generated from the dataclasses, so a key added later is covered too: for each
number key, inf, -inf, nan, a value past each bound and a huge integer are refused with a
message naming the key, the value and the range; the default and both bounds are accepted;
and docs/configuration.md shows the range.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from daemon import config as cfg
from daemon.config import ConfigError, Settings, load_settings, render_markdown


def number_keys() -> list[tuple[str, str, dataclasses.Field[Any]]]:
    """(table or "", key, field) of every int or float key, all tables included."""
    out: list[tuple[str, str, dataclasses.Field[Any]]] = []
    for table, cls in [("", Settings), *cfg._TABLES.items()]:
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or f.name in cfg._TABLES:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = cfg.kind_of(f)
            if kind in (int, float) and not isinstance(default, bool):
                out.append((table, f.name, f))
    return out


KEYS = number_keys()
IDS = [f"{t}.{k}" if t else k for t, k, _ in KEYS]


def toml(table: str, key: str, value: str) -> str:
    return f"[{table}]\n{key} = {value}\n" if table else f"{key} = {value}\n"


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_settings(path, environ={})


def is_int(f: dataclasses.Field[Any]) -> bool:
    return cfg.kind_of(f) is int


def test_the_known_crashers_are_covered() -> None:
    names = {k for _, k, _ in KEYS}
    assert {"tick_s", "max_file_mb", "worker_stall_s", "max_queued", "port", "outputs_days"} <= names


@pytest.mark.parametrize(("table", "key", "f"), KEYS, ids=IDS)
def test_non_finite_values_are_refused(
    tmp_path: Path, table: str, key: str, f: dataclasses.Field[Any]
) -> None:
    name = f"{table}.{key}" if table else key
    for value in ("inf", "-inf", "nan", "+inf", "1e400"):
        with pytest.raises(ConfigError) as info:
            load(tmp_path, toml(table, key, value))
        message = str(info.value)
        assert name in message and ("finite" in message or "integer" in message), message


@pytest.mark.parametrize(("table", "key", "f"), KEYS, ids=IDS)
def test_values_outside_the_range_are_refused(
    tmp_path: Path, table: str, key: str, f: dataclasses.Field[Any]
) -> None:
    lo, hi = cfg._bounds(f)
    assert hi is not None, f"{key} has no upper bound: give it hi= in daemon/config.py"
    name = f"{table}.{key}" if table else key
    step = 1 if is_int(f) else max(1e-6, abs(hi - lo) * 1e-3)
    bad = [hi + step, lo - step, 2**63 - 1, -(2**63)]
    if key in cfg._POSITIVE:
        bad.append(0)
    for value in bad:
        if lo <= value <= hi and not (key in cfg._POSITIVE and value <= 0):
            continue
        text = str(int(value)) if is_int(f) else repr(float(value))
        with pytest.raises(ConfigError) as info:
            load(tmp_path, toml(table, key, text))
        message = str(info.value)
        assert name in message and "allowed:" in message and cfg.allowed_range(f) in message, message


@pytest.mark.parametrize(("table", "key", "f"), KEYS, ids=IDS)
def test_the_default_and_the_bounds_are_accepted(
    tmp_path: Path, table: str, key: str, f: dataclasses.Field[Any]
) -> None:
    lo, hi = cfg._bounds(f)
    default = f.default if f.default is not dataclasses.MISSING else None
    ok = [v for v in (default, hi, lo) if v is not None and not (key in cfg._POSITIVE and v <= 0)]
    for value in ok:
        text = str(int(value)) if is_int(f) else repr(float(value))
        settings = load(tmp_path, toml(table, key, text))
        got = getattr(getattr(settings, table) if table else settings, key)
        assert got == value and (is_int(f) or math.isfinite(got))


def test_every_range_is_documented() -> None:
    doc = render_markdown()
    rows: dict[str, str] = {}
    table = ""
    for line in doc.splitlines():
        if line.startswith("## "):
            table = line[3:].strip("[]") if line.startswith("## [") else ""
        elif line.startswith("| `"):
            key = line.split("|")[1].strip().strip("`")
            rows[f"{table}.{key}" if table else key] = line
    for table, key, f in KEYS:
        line = rows[f"{table}.{key}" if table else key]
        assert cfg.allowed_range(f) in line, line
    assert "no `inf`, no `nan`" in doc
    assert (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text() == doc


def test_an_unreadable_or_too_deep_file_is_a_config_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(deep, environ={})
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(folder, environ={})
