"""`tts_audio` jobs (daemon/jobs.py, pipeline/tts_text.py): the reference's format parses, each
bad job is one rejection naming the field, the spec round-trips through the ledger's JSON, the
request voices into the job's own folder, and the text and voice enter the dedupe key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from daemon.intake import dedupe_key
from daemon.jobs import TTS_FOLDER, InvalidJob, JobSpec, parse_job
from pipeline.tts_text import MAX_TEXT_CHARS, speaker_turns, voice_name


def _parse(tmp_path: Path, **doc: Any) -> JobSpec:
    (tmp_path / "face.png").write_bytes(b"png")
    (tmp_path / "voice.wav").write_bytes(b"wav")
    return parse_job(json.dumps({"prompt": "p", "cond_video": "face.png", **doc}).encode(), base_dir=tmp_path)


def _errors(tmp_path: Path, **doc: Any) -> dict[str, str]:
    with pytest.raises(InvalidJob) as info:
        _parse(tmp_path, **doc)
    return {e.field: e.code for e in info.value.errors}


def test_the_reference_format_parses(tmp_path: Path) -> None:
    """As the reference's app.py builds it: cond_audio empty, the voice as a path under weights/."""
    tts = {"text": "Hello there.", "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}
    spec = _parse(tmp_path, cond_audio={}, tts_audio=tts)
    assert spec.cond_audio == () and spec.persons == ("person1",) and spec.num_speakers == 1
    assert spec.media_files == ("face.png",)
    assert spec.to_dict()["tts_audio"] == {"text": "Hello there.", "human1_voice": "af_heart"}
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec
    request = spec.to_request(tmp_path)
    key = spec.tts.key(spec.seed) if spec.tts else ""
    assert request.audio == (tmp_path.absolute() / TTS_FOLDER / key / "person1.wav",)
    assert spec.to_request(tmp_path).audio == request.audio  # the same job: the same files
    assert spec.with_seed(spec.seed + 1).to_request(tmp_path).audio != request.audio  # another seed
    assert request.tts is not None and request.tts.voices == ("af_heart",)
    assert (request.tts.text, request.tts.lang_code, request.tts.speed) == ("Hello there.", "a", 1.0)


def test_two_speakers_with_marks_bbox_and_settings(tmp_path: Path) -> None:
    tts = {
        "text": "(s1) Hi.\n(s2) Hello! (s1) Bye.",
        "human1_voice": "af_heart",
        "human2_voice": "am_adam.pt",
    }
    bbox = {"person1": [0, 0, 10, 10], "person2": [0, 10, 10, 20]}
    spec = _parse(tmp_path, tts_audio=tts, bbox=bbox, lang_code="b", speed=1.25, audio_type="add")
    assert spec.persons == ("person1", "person2") and spec.bbox == ((0, 0, 10, 10), (0, 10, 10, 20))
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec
    request = spec.to_request(tmp_path)
    assert [p.name for p in request.audio] == ["person1.wav", "person2.wav"]
    assert request.audio_type == "para"  # the voiced tracks take turns already: summed, never chained
    assert request.tts is not None and request.tts.voices == ("af_heart", "am_adam")
    assert (request.tts.lang_code, request.tts.speed) == ("b", 1.25)
    assert speaker_turns(tts["text"]) == ((1, "Hi."), (2, "Hello!"), (1, "Bye."))


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"tts_audio": {"text": "  ", "human1_voice": "af_heart"}}, {"tts_audio.text": "bad_value"}),
        (
            {"tts_audio": {"text": "a" * (MAX_TEXT_CHARS + 1), "human1_voice": "af_heart"}},
            {"tts_audio.text": "bad_value"},
        ),
        ({"tts_audio": {"text": 5, "human1_voice": "af_heart"}}, {"tts_audio.text": "bad_type"}),
        ({"tts_audio": {"human1_voice": "af_heart"}}, {"tts_audio.text": "missing_field"}),
        ({"tts_audio": {"text": "Hi."}}, {"tts_audio.human1_voice": "missing_field"}),
        (
            {"tts_audio": {"text": "Hi.", "human1_voice": "../../etc/x.pt"}},
            {"tts_audio.human1_voice": "bad_value"},
        ),
        (
            {"tts_audio": {"text": "Hi.", "human1_voice": "weights/other/af_heart.pt"}},
            {"tts_audio.human1_voice": "bad_value"},
        ),
        (
            {"tts_audio": {"text": "Hi. Yo.", "human1_voice": "af_heart", "human2_voice": "am_adam"}},
            {"tts_audio.text": "bad_value"},
        ),
        (
            {
                "tts_audio": {
                    "text": "(s1) Hi. (s3) Yo.",
                    "human1_voice": "af_heart",
                    "human2_voice": "am_adam",
                }
            },
            {"tts_audio.text": "bad_value"},
        ),
        (
            {
                "tts_audio": {"text": "Hi.", "human1_voice": "af_heart"},
                "cond_audio": {"person1": "voice.wav"},
            },
            {"cond_audio.person1": "bad_value"},
        ),
        (
            {"tts_audio": {"text": "Hi.", "human1_voice": "af_heart", "voice": "x"}},
            {"tts_audio": "bad_value"},
        ),
        ({"tts_audio": ["Hi."]}, {"tts_audio": "bad_type"}),
        (
            {"tts_audio": {"text": "Hi.", "human1_voice": "af_heart"}, "lang_code": "j"},
            {"lang_code": "bad_value"},
        ),
        ({"tts_audio": {"text": "Hi.", "human1_voice": "af_heart"}, "speed": 9}, {"speed": "bad_value"}),
    ],
)
def test_each_bad_job_is_one_rejection_naming_the_field(tmp_path: Path, doc: dict, expected: dict) -> None:
    assert _errors(tmp_path, **doc) == expected


def test_rejection_messages_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob) as info:
        _parse(
            tmp_path, cond_audio={"person1": "voice.wav"}, tts_audio={"text": "", "human1_voice": "af_heart"}
        )
    text = str(info.value)
    assert "give one of the two" in text and "tts_audio.text: empty" in text
    with pytest.raises(InvalidJob, match=r"\(s1\) or \(s2\)"):
        _parse(tmp_path, tts_audio={"text": "Hi.", "human1_voice": "af_heart", "human2_voice": "am_adam"})


def test_voice_names() -> None:
    for raw in (
        "af_heart",
        "af_heart.pt",
        "Kokoro-82M/voices/af_heart.pt",
        "weights/Kokoro-82M/voices/af_heart.pt",
    ):
        assert voice_name(raw) == "af_heart", raw
    for raw in ("", "/abs/af_heart.pt", "voices/af_heart.pt", "Kokoro-82M/voices/../x.pt", "AF HEART"):
        assert voice_name(raw) is None, raw


def test_text_voice_and_tts_settings_enter_the_dedupe_key(tmp_path: Path) -> None:
    def key(**tts_and_settings: Any) -> str:
        tts = {"text": "Hello.", "human1_voice": "af_heart"}
        tts.update(tts_and_settings.pop("tts", {}))
        spec = _parse(tmp_path, tts_audio=tts, seed=1, **tts_and_settings)
        return dedupe_key(spec, {"face.png": "h"})

    first = key()
    assert key() == first
    assert key(tts={"human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}) == first  # the same voice
    others = [
        key(tts={"text": "Goodbye."}),
        key(tts={"human1_voice": "am_adam"}),
        key(lang_code="b"),
        key(speed=1.5),
    ]
    assert len({first, *others}) == 5


def test_a_job_with_speech_files_keeps_its_spec(tmp_path: Path) -> None:
    """No `tts_audio` key in the ledger's JSON of a job with speech files (as before TTS)."""
    spec = _parse(tmp_path, cond_audio={"person1": "voice.wav"})
    assert "tts_audio" not in spec.to_dict() and spec.tts is None and spec.to_request(tmp_path).tts is None
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec


def test_intake_rejects_a_voice_the_weights_folder_lacks(tmp_path: Path) -> None:
    """At intake when the folder the worker reads has voices; else the render decides."""
    from daemon.config import load_settings
    from daemon.intake import tts_voice_problem

    weights = tmp_path / "weights"
    (weights / "Kokoro-82M" / "voices").mkdir(parents=True)
    (weights / "tiny.json").write_text("{}")
    (weights / "Kokoro-82M" / "voices" / "af_heart.pt").write_bytes(b"voice")
    config = tmp_path / "infinitetalk.toml"
    config.write_text(f'weights_dir = "{weights}"\n')
    settings = load_settings(config)
    spec = _parse(
        tmp_path, tts_audio={"text": "(s1) Hi. (s2) Yo.", "human1_voice": "af_heart", "human2_voice": "am_x"}
    )
    assert spec.tts is not None
    why = tts_voice_problem(settings, spec.tts)
    assert (
        why is not None
        and why.startswith("tts_audio.human2_voice: unknown voice 'am_x'")
        and "af_heart" in why
    )
    (weights / "Kokoro-82M" / "voices" / "am_x.pt").write_bytes(b"voice")
    assert tts_voice_problem(settings, spec.tts) is None
    shutil.rmtree(weights / "Kokoro-82M")
    assert tts_voice_problem(settings, spec.tts) is None  # no voices folder: the render names it
