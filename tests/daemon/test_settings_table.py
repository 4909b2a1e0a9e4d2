"""daemon/jobs.py SETTINGS: one row per scalar job key drives parsing, the defaults, the stored
spec, the render request, the `[defaults]` TOML table, the dedupe key and docs/job-format.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, settings_from_mapping
from daemon.intake import dedupe_key
from daemon.jobs import KNOWN_KEYS, PRESETS, SETTINGS, InvalidJob, JobDefaults, JobSpec, Setting, parse_job
from daemon.jobs_doc import DOC, render_settings_table, updated
from pipeline.presets import BASE, LIGHTX2V_4STEP
from pipeline.types import GenerationRequest

HASHES = {"face.png": "h1", "voice.wav": "h2"}
JOB = {"prompt": "p", "cond_video": "face.png", "cond_audio": {"person1": "voice.wav"}, "seed": 1}


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    for name in HASHES:
        (tmp_path / name).write_bytes(b"not empty")
    return tmp_path


def _parse(base: Path, **keys: Any) -> JobSpec:
    return parse_job(json.dumps({**JOB, **keys}).encode(), base_dir=base)


def _bad_value(s: Setting) -> Any:
    """A value outside the row's bounds or choices (of the right JSON type where it has one)."""
    if s.kind is bool:
        return "yes"
    if s.choices:
        return "no-such-choice"
    if s.kind is int:
        return int(s.hi or 0) + 1
    if s.kind is float:
        return (s.hi or 0) * 2 + 1
    return 12345  # a string setting given a number


def _other_value(s: Setting) -> Any:
    """A valid value different from the default."""
    if s.kind is bool:
        return not s.default
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if s.kind is int:
        lo = int(s.lo or 0)
        return next(v for v in range(lo, lo + 9) if v != s.default and not (s.check and s.check(v)))
    if s.kind is float:
        return ((s.lo or 0.0) + (s.hi or 1.0)) / 2
    return "another text"


def test_every_number_setting_has_bounds_and_every_request_field_exists() -> None:
    request_fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    for s in SETTINGS:
        if s.kind in (int, float):
            assert s.lo is not None and s.hi is not None, s.name
        assert s.request is None or s.request in request_fields, s.name
        assert s.name in KNOWN_KEYS and s.doc, s.name


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.default is not None], ids=lambda s: s.name)
def test_every_setting_parses_its_own_default(job_dir: Path, s: Setting) -> None:
    spec = _parse(job_dir, **{s.name: s.default})
    assert getattr(spec, s.name) == s.default
    assert getattr(JobDefaults(), s.name) == s.default


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.name)
def test_a_value_out_of_bounds_is_rejected_naming_the_key_and_the_value(job_dir: Path, s: Setting) -> None:
    bad = _bad_value(s)
    with pytest.raises(InvalidJob) as e:
        _parse(job_dir, **{s.name: bad})
    (error,) = e.value.errors
    assert error.field == s.name and error.code in ("bad_type", "bad_value")
    assert s.name in error.message and repr(bad) in error.message


def test_a_further_check_of_a_row_is_applied(job_dir: Path) -> None:
    with pytest.raises(InvalidJob, match="motion_frame must be 4n\\+1.*got 7"):
        _parse(job_dir, motion_frame=7)


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.optional], ids=lambda s: s.name)
def test_null_for_an_optional_setting_takes_the_default(job_dir: Path, s: Setting) -> None:
    spec = _parse(job_dir, **{s.name: None})
    if s.name == "seed":  # the default: unset, so drawn
        assert spec.seed_drawn
    else:
        assert getattr(spec, s.name) == getattr(_parse(job_dir), s.name)


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.since], ids=lambda s: s.name)
def test_a_spec_stored_before_a_setting_existed_loads_with_its_default(job_dir: Path, s: Setting) -> None:
    """A spec of version `since - 1` lacks every setting of `since` and later."""
    changed = {t.name: _other_value(t) for t in SETTINGS if t.since >= s.since and t.name != "rerender"}
    stored = _parse(job_dir, **changed).to_dict()
    older = {k: v for k, v in stored.items() if not any(t.name == k and t.since >= s.since for t in SETTINGS)}
    spec = JobSpec.from_dict(older)
    for t in SETTINGS:
        expected = t.default if t.since >= s.since else stored[t.name]
        assert getattr(spec, t.name) == expected, t.name


def test_a_stored_spec_without_a_first_release_setting_is_an_error(job_dir: Path) -> None:
    stored = _parse(job_dir).to_dict()
    del stored["sample_steps"]
    with pytest.raises(KeyError):
        JobSpec.from_dict(stored)


def test_the_request_gets_every_setting_that_names_a_request_field(job_dir: Path) -> None:
    changed = {s.name: _other_value(s) for s in SETTINGS if s.name != "rerender"}
    spec = _parse(job_dir, **changed)
    request = spec.to_request(job_dir)
    for s in SETTINGS:
        if s.request:
            assert getattr(request, s.request) == changed[s.name], s.name


def test_the_dedupe_key_follows_each_rows_rule(job_dir: Path) -> None:
    key = dedupe_key(_parse(job_dir), HASHES)
    for s in SETTINGS:
        if s.name == "rerender":  # a duplicate with rerender is rendered (intake), same key
            continue
        other = dedupe_key(_parse(job_dir, **{s.name: _other_value(s)}), HASHES)
        if s.dedupe == "never" or (s.dedupe == "when_on" and s.switch is not None):
            assert other == key, s.name  # the switch (use_apg) is off
        else:
            assert other != key, s.name
    apg_on = dedupe_key(_parse(job_dir, use_apg=True), HASHES)
    assert dedupe_key(_parse(job_dir, use_apg=True, apg_momentum=0.5), HASHES) != apg_on


def test_the_defaults_table_of_the_config_is_the_table(tmp_path: Path) -> None:
    configurable = {s.name for s in SETTINGS if s.config}
    settings = settings_from_mapping({"defaults": {"sample_steps": 8, "sample_shift": ""}}, base=tmp_path)
    assert settings.defaults.sample_steps == 8 and settings.defaults.sample_shift is None
    for s in SETTINGS:
        raw = {"defaults": {s.name: _bad_value(s)}}
        with pytest.raises(ConfigError) as e:
            settings_from_mapping(raw, base=tmp_path)
        text = str(e.value)
        if s.name in configurable:
            assert f"defaults.{s.name}" in text and repr(_bad_value(s)).strip("'") in text
        else:
            assert "unknown key" in text  # priority, rerender: a job's own


def test_the_recipes_are_the_presets_of_the_request_and_the_daemon() -> None:
    request = GenerationRequest(prompt="p", cond_media=Path("f.png"), audio=(None,))
    for name, value in BASE.as_dict().items():
        assert getattr(request, name) == value and getattr(PRESETS["base"], name) == value
        assert getattr(JobDefaults(), name) == getattr(LIGHTX2V_4STEP, name)


def test_the_settings_table_of_the_job_format_doc_is_up_to_date() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert updated(text) == text, "run: .venv/bin/python -m daemon.jobs_doc"
    assert render_settings_table() in text


def test_a_rows_further_check_applies_to_the_defaults_table_too(tmp_path: Path) -> None:
    """motion_frame = 8 in [defaults] is refused at start, not by every job that leaves it out."""
    with pytest.raises(ConfigError, match="defaults.motion_frame: motion_frame must be 4n\\+1.*got 8"):
        settings_from_mapping({"defaults": {"motion_frame": 8}}, base=tmp_path)


def test_an_integer_too_large_for_a_float_is_a_bad_job_not_a_crash(job_dir: Path) -> None:
    """JSON may hold 10**400; it once raised OverflowError out of parse_job."""
    huge = "1" + "0" * 400
    for key in ("sample_shift", "apg_norm_threshold"):
        text = json.dumps(JOB)[:-1] + f', "{key}": {huge}}}'
        with pytest.raises(InvalidJob) as e:
            parse_job(text.encode(), base_dir=job_dir)
        assert e.value.errors[0].field == key and huge in e.value.errors[0].message
    two = {**JOB, "cond_audio": {"person1": "voice.wav", "person2": "None"}}
    text = json.dumps(two)[:-1] + f', "bbox": {{"person1": [0, 0, {huge}, 1], "person2": [0, 0, 1, 1]}}}}'
    with pytest.raises(InvalidJob, match="bbox.person1 must be 4 numbers"):
        parse_job(text.encode(), base_dir=job_dir)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({}, "1037b4c5e355b0c48c2cd804747d6141b5455c54336c44694b80717faccbedef"),
        (
            {"priority": 5, "rerender": True, "apg_momentum": 0.5},
            "1037b4c5e355b0c48c2cd804747d6141b5455c54336c44694b80717faccbedef",
        ),
        ({"use_apg": True}, "fa8cc6e4c1f5fd0e1f030c4a9acc3184d5a344d5a546ab9bc975640ee909280d"),
        (
            {"noise": "reference", "size": "infinitetalk-720"},
            "7399e54388de32353d95f9280110eb83d4851a03e489e156ee3abaa1e832f1fd",
        ),
    ],
)
def test_the_dedupe_keys_of_existing_jobs_are_the_keys_the_version_before_the_table_gave(
    job_dir: Path, extra: dict[str, Any], key: str
) -> None:
    """Keys computed by main at 65e197d (before SETTINGS): a stored job's key must still match."""
    assert dedupe_key(_parse(job_dir, **extra), HASHES) == key
