"""daemon/jobs.py: job JSON -> JobSpec -> GenerationRequest, and every kind of bad job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.jobs import (
    DEFAULT_NEGATIVE_PROMPT,
    PRESETS,
    InvalidJob,
    JobDefaults,
    JobSpec,
    checksum_mismatches,
    load_job,
    parse_job,
    sha256_file,
)


def _files(base: Path, *names: str) -> None:
    for name in names:
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 16)


def _raw(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _codes(err: InvalidJob) -> dict[str, str]:
    return {e.field: e.code for e in err.errors}


def test_reference_example_parses_with_defaults(tmp_path: Path) -> None:
    _files(tmp_path, "examples/single/ref_image.png", "examples/single/1.wav")
    doc = {
        "prompt": "A woman is singing.",
        "cond_video": "examples/single/ref_image.png",
        "cond_audio": {"person1": "examples/single/1.wav"},
    }
    spec = parse_job(_raw(doc), base_dir=tmp_path, defaults=JobDefaults())
    assert spec.cond_video == "examples/single/ref_image.png"
    assert spec.cond_audio == (("person1", "examples/single/1.wav"),)
    # lightx2v 4-step defaults
    assert (spec.sample_steps, spec.sample_shift) == (4, 2.0)
    assert (spec.sample_text_guide_scale, spec.sample_audio_guide_scale) == (1.0, 2.0)
    assert spec.mode == "streaming" and spec.motion_frame == 9 and spec.max_frame_num is None
    assert spec.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert spec.seed_drawn and 0 <= spec.seed < 2**32
    assert not spec.is_video and spec.num_speakers == 1


def test_drawn_seeds_differ_and_are_recorded(tmp_path: Path) -> None:
    _files(tmp_path, "a.png", "b.wav")
    doc = {"prompt": "p", "cond_video": "a.png", "cond_audio": {"person1": "b.wav"}}
    seeds = {parse_job(_raw(doc), base_dir=tmp_path).seed for _ in range(8)}
    assert len(seeds) > 1
    spec = parse_job(_raw({**doc, "seed": 7}), base_dir=tmp_path)
    assert spec.seed == 7 and not spec.seed_drawn
    fixed = parse_job(_raw(doc), base_dir=tmp_path, defaults=JobDefaults(seed=99))
    assert fixed.seed == 99 and not fixed.seed_drawn
    assert json.loads(spec.to_json())["seed"] == 7


def test_base_preset_resolves_shift_by_size(tmp_path: Path) -> None:
    _files(tmp_path, "a.png", "b.wav")
    doc = {"prompt": "p", "cond_video": "a.png", "cond_audio": {"person1": "b.wav"}}
    base = PRESETS["base"]
    assert parse_job(_raw(doc), base_dir=tmp_path, defaults=base).sample_shift == 7.0
    spec = parse_job(_raw({**doc, "size": "infinitetalk-720"}), base_dir=tmp_path, defaults=base)
    assert (spec.sample_shift, spec.sample_steps, spec.sample_text_guide_scale) == (11.0, 40, 5.0)
    assert parse_job(_raw({**doc, "sample_shift": 3}), base_dir=tmp_path, defaults=base).sample_shift == 3.0


def test_two_speakers_full_settings_roundtrip(tmp_path: Path) -> None:
    _files(tmp_path, "two.JPG", "man.WAV", "woman.Flac")
    doc = {
        "prompt": "Two people talk.",
        "cond_video": "two.JPG",
        "cond_audio": {"person1": "man.WAV", "person2": "woman.Flac"},
        "audio_type": "add",
        "bbox": {"person1": [0, 0, 60, 48], "person2": [0, 48, 60, 97]},
        "size": "infinitetalk-720",
        "sample_steps": 8,
        "sample_shift": 5,
        "sample_text_guide_scale": 5.0,
        "sample_audio_guide_scale": 4,
        "seed": 42,
        "mode": "clip",
        "motion_frame": 13,
        "max_frame_num": 200,
        "color_correction_strength": 0.5,
        "priority": 3,
        "negative_prompt": "",
        "checksums": {"man.WAV": sha256_file(tmp_path / "man.WAV")},
    }
    spec = parse_job(_raw(doc), base_dir=tmp_path)
    assert spec.num_speakers == 2 and spec.audio_type == "add"
    assert spec.bbox == ((0.0, 0.0, 60.0, 48.0), (0.0, 48.0, 60.0, 97.0))
    assert spec.media_files == ("two.JPG", "man.WAV", "woman.Flac")
    assert checksum_mismatches(spec, tmp_path) == []
    (tmp_path / "man.WAV").write_bytes(b"changed")
    assert checksum_mismatches(spec, tmp_path) == ["man.WAV"]
    again = JobSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec

    req = spec.to_request(tmp_path)
    assert req.cond_media == tmp_path.absolute() / "two.JPG"
    assert req.audio == (tmp_path.absolute() / "man.WAV", tmp_path.absolute() / "woman.Flac")
    assert (req.seed, req.mode, req.max_frame_num, req.sample_shift) == (42, "clip", 200, 5.0)
    assert req.bbox == spec.bbox and req.negative_prompt == ""


def test_a_silent_speaker_is_the_reference_none(tmp_path: Path) -> None:
    """`"None"` for one of two speakers: silent; it names no file, so nothing is hashed or moved."""
    _files(tmp_path, "two.png", "man.wav")
    doc = {"prompt": "p", "cond_video": "two.png", "cond_audio": {"person1": "man.wav", "person2": "None"}}
    spec = parse_job(_raw(doc), base_dir=tmp_path)
    assert spec.num_speakers == 2 and spec.cond_audio == (("person1", "man.wav"), ("person2", "None"))
    assert spec.media_files == ("two.png", "man.wav")
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec
    assert spec.to_request(tmp_path).audio == (tmp_path.absolute() / "man.wav", None)
    first = parse_job(
        _raw({**doc, "cond_audio": {"person1": "None", "person2": "man.wav"}}), base_dir=tmp_path
    )
    assert first.to_request(tmp_path).audio == (None, tmp_path.absolute() / "man.wav")
    for audio in ({"person1": "None"}, {"person1": "None", "person2": "None"}):
        with pytest.raises(InvalidJob) as info:
            parse_job(_raw({**doc, "cond_audio": audio}), base_dir=tmp_path)
        assert _codes(info.value) == {"cond_audio": "bad_value"}
        assert "None" in info.value.message and "silent" in info.value.message


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    _files(tmp_path, "a.png", "b.txt")
    doc = {
        "prompt": 3,
        "cond_video": "a.png",
        "cond_audio": {"person1": "b.txt"},
        "size": "infinitetalk-1080",
        "sample_steps": 0,
        "motion_frame": 10,
        "color_correction_strength": 2,
        "typo_key": 1,
        "seed": -1,
    }
    with pytest.raises(InvalidJob) as info:
        parse_job(_raw(doc), base_dir=tmp_path)
    codes = _codes(info.value)
    assert codes == {
        "typo_key": "unknown_key",
        "prompt": "bad_type",
        "cond_audio.person1": "bad_extension",
        "size": "bad_value",
        "sample_steps": "bad_value",
        "motion_frame": "bad_value",
        "color_correction_strength": "bad_value",
        "seed": "bad_value",
    }
    assert info.value.code == "unknown_key" and info.value.field == "typo_key"
    assert "infinitetalk-1080" in str(info.value) and "b.txt" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{not json", "bad_json"), (b"[1, 2]", "bad_json"), (b"\xff\xfe\x00", "bad_json")],
)
def test_unreadable_json(tmp_path: Path, raw: bytes, code: str) -> None:
    with pytest.raises(InvalidJob) as info:
        parse_job(raw, base_dir=tmp_path)
    assert info.value.code == code and info.value.field == ""


def test_missing_fields_and_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob) as info:
        parse_job(b"{}", base_dir=tmp_path)
    assert _codes(info.value) == {
        "prompt": "missing_field",
        "cond_video": "missing_field",
        "cond_audio": "missing_field",
    }
    with pytest.raises(InvalidJob) as info:
        parse_job(
            _raw({"prompt": "p", "cond_video": "nope.png", "cond_audio": {"person2": "x.wav"}}),
            base_dir=tmp_path,
        )
    assert _codes(info.value) == {"cond_video": "missing_file", "cond_audio.person1": "missing_field"}
    assert "nope.png" in info.value.message


@pytest.mark.parametrize(
    "path", ["/etc/passwd.png", "../outside.png", "sub/../../x.png", "~/x.png", "C:/x.png"]
)
def test_paths_leaving_the_folder_are_rejected(tmp_path: Path, path: str) -> None:
    base = tmp_path / "inbox"
    _files(base, "b.wav")
    _files(tmp_path, "outside.png")
    doc = {"prompt": "p", "cond_video": path, "cond_audio": {"person1": "b.wav"}}
    with pytest.raises(InvalidJob) as info:
        parse_job(_raw(doc), base_dir=base)
    assert _codes(info.value) == {"cond_video": "path_escape"}


def test_symlinks_fifos_empty_and_oversize_are_rejected(tmp_path: Path) -> None:
    base = tmp_path / "inbox"
    _files(base, "real.png", "big.wav")
    (base / "real.png").write_bytes(b"png")
    _files(tmp_path, "secret.wav")
    os.symlink(tmp_path / "secret.wav", base / "link.wav")
    os.symlink(tmp_path, base / "dirlink")
    os.mkfifo(base / "pipe.wav")
    (base / "empty.png").write_bytes(b"")
    doc = {"prompt": "p", "cond_video": "real.png", "cond_audio": {"person1": "link.wav"}}
    cases = {
        "link.wav": "symlink",
        "dirlink/secret.wav": "symlink",
        "pipe.wav": "not_a_file",
        "big.wav": "too_large",
    }
    for name, code in cases.items():
        doc["cond_audio"] = {"person1": name}
        with pytest.raises(InvalidJob) as info:
            parse_job(_raw(doc), base_dir=base, defaults=JobDefaults(max_media_bytes=8))
        assert _codes(info.value) == {"cond_audio.person1": code}, name
        assert name in info.value.message
    doc["cond_audio"] = {"person1": "big.wav"}
    doc["cond_video"] = "empty.png"
    with pytest.raises(InvalidJob) as info:
        parse_job(_raw(doc), base_dir=base)
    assert _codes(info.value) == {"cond_video": "empty_file"}


def test_bbox_and_checksums_validation(tmp_path: Path) -> None:
    _files(tmp_path, "a.png", "b.wav", "c.wav")
    base = {"prompt": "p", "cond_video": "a.png", "cond_audio": {"person1": "b.wav", "person2": "c.wav"}}
    bad = [
        ({"bbox": {"person1": [0, 0, 1, 1]}}, "bbox", "bad_value"),
        ({"bbox": {"person1": [0, 0, 1], "person2": [0, 0, 1, 1]}}, "bbox.person1", "bad_type"),
        ({"bbox": {"person1": [5, 0, 1, 1], "person2": [0, 0, 1, 1]}}, "bbox.person1", "bad_value"),
        ({"checksums": {"other.wav": "0" * 64}}, "checksums.other.wav", "bad_value"),
        ({"checksums": {"b.wav": "abc"}}, "checksums.b.wav", "bad_value"),
        ({"audio_type": "mix"}, "audio_type", "bad_value"),
        ({"tts_audio": "hi"}, "tts_audio", "bad_type"),  # tests/daemon/test_jobs_tts.py: the rest
    ]
    for extra, field, code in bad:
        with pytest.raises(InvalidJob) as info:
            parse_job(_raw({**base, **extra}), base_dir=tmp_path)
        assert _codes(info.value) == {field: code}, extra
    # one speaker: bbox is ignored, as the reference does (CONTRACT.md's own example has one)
    one = {"prompt": "p", "cond_video": "a.png", "cond_audio": {"person1": "b.wav"}}
    for bbox in ({"person1": [0, 0, 2, 2]}, {"person1": [0, 0, 640, 720], "person2": [0, 640, 640, 1280]}):
        assert parse_job(_raw({**one, "bbox": bbox}), base_dir=tmp_path).bbox is None


def test_the_contract_example_job_parses(tmp_path: Path) -> None:
    """CONTRACT.md section 4's example, verbatim apart from the checksums' values."""
    _files(tmp_path, "face.png", "voice.wav")
    doc = {
        "prompt": "A woman is talking to the camera in a bright studio.",
        "cond_video": "face.png",
        "cond_audio": {"person1": "voice.wav"},
        "audio_type": "para",
        "bbox": {"person1": [0, 0, 640, 720], "person2": [0, 640, 640, 1280]},
        "size": "infinitetalk-480",
        "sample_steps": 4,
        "seed": 42,
        "priority": 0,
        "checksums": {
            "face.png": sha256_file(tmp_path / "face.png"),
            "voice.wav": sha256_file(tmp_path / "voice.wav"),
        },
    }
    spec = parse_job(_raw(doc), base_dir=tmp_path)
    assert (spec.num_speakers, spec.bbox, spec.seed, spec.sample_steps) == (1, None, 42, 4)


def test_load_job_uses_the_file_folder(tmp_path: Path) -> None:
    bundle = tmp_path / "myjob"
    _files(bundle, "face.webp", "voice.m4a")
    (bundle / "job.json").write_text(
        json.dumps(
            {"prompt": "p", "cond_video": "face.webp", "cond_audio": {"person1": "voice.m4a"}, "seed": 1}
        )
    )
    spec = load_job(bundle / "job.json")
    assert spec.to_request(bundle).cond_media == bundle.absolute() / "face.webp"
    with pytest.raises(InvalidJob) as info:
        load_job(tmp_path / "absent.json")
    assert info.value.code == "missing_file"


def test_apg_settings(tmp_path: Path) -> None:
    """`use_apg`, `apg_momentum`, `apg_norm_threshold` (the reference CLI's APG flags) reach the
    request; bad values are named; a spec stored before they existed still loads (APG off)."""
    _files(tmp_path, "a.png", "b.wav")
    doc = {"prompt": "p", "cond_video": "a.png", "cond_audio": {"person1": "b.wav"}}
    plain = parse_job(_raw(doc), base_dir=tmp_path)
    assert (plain.use_apg, plain.apg_momentum, plain.apg_norm_threshold) == (False, -0.75, 55.0)
    spec = parse_job(
        _raw({**doc, "use_apg": True, "apg_momentum": -0.5, "apg_norm_threshold": 0}), base_dir=tmp_path
    )
    req = spec.to_request(tmp_path)
    assert (req.use_apg, req.apg_momentum, req.apg_norm_threshold) == (True, -0.5, 0.0)
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec
    on = parse_job(_raw(doc), base_dir=tmp_path, defaults=JobDefaults(use_apg=True))
    assert on.use_apg
    with pytest.raises(InvalidJob) as info:
        parse_job(
            _raw({**doc, "use_apg": "yes", "apg_momentum": 3, "apg_norm_threshold": -1}), base_dir=tmp_path
        )
    assert _codes(info.value) == {
        "use_apg": "bad_type",
        "apg_momentum": "bad_value",
        "apg_norm_threshold": "bad_value",
    }
    old = json.loads(plain.to_json())
    for key in ("use_apg", "apg_momentum", "apg_norm_threshold"):
        del old[key]
    assert JobSpec.from_dict(old) == plain


def test_a_video_with_sound_may_be_the_speech(tmp_path: Path) -> None:
    """As in the reference, a cond_audio path may be a video: its audio stream is the speech."""
    _files(tmp_path, "talk.mp4", "clip.AVI")
    doc = {"prompt": "p", "cond_video": "talk.mp4", "cond_audio": {"person1": "talk.mp4"}}
    spec = parse_job(_raw(doc), base_dir=tmp_path)
    assert spec.cond_audio == (("person1", "talk.mp4"),) and spec.is_video
    assert (
        parse_job(_raw({**doc, "cond_audio": {"person1": "clip.AVI"}}), base_dir=tmp_path).num_speakers == 1
    )


def test_dedupe_key_ignores_apg_settings_while_apg_is_off(tmp_path: Path) -> None:
    """The same job gives the same key as before the APG settings existed (they are left out while
    APG is off); turning APG on, or changing its settings then, gives another key."""
    from daemon.intake import dedupe_key

    _files(tmp_path, "a.png", "b.wav")
    doc = {"prompt": "p", "cond_video": "a.png", "cond_audio": {"person1": "b.wav"}, "seed": 1}
    hashes = {"a.png": "h1", "b.wav": "h2"}
    plain = parse_job(_raw(doc), base_dir=tmp_path)
    key = dedupe_key(plain, hashes)
    assert dedupe_key(parse_job(_raw({**doc, "apg_momentum": -0.5}), base_dir=tmp_path), hashes) == key
    on = parse_job(_raw({**doc, "use_apg": True}), base_dir=tmp_path)
    assert dedupe_key(on, hashes) != key
    other = parse_job(_raw({**doc, "use_apg": True, "apg_momentum": -0.5}), base_dir=tmp_path)
    assert dedupe_key(other, hashes) != dedupe_key(on, hashes)
