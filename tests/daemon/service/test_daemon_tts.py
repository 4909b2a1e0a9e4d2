"""A text-to-speech job through the daemon on the real tiny model: the tiny weights folder gets its
tiny Kokoro-82M, the job shows its own `tts` stage, the MP4 carries the voiced speech at 24 kHz,
the sidecar records the text and voice. A broken kokoro install fails the job as
`tts_unavailable` and the daemon renders the next job."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av
import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle, make_rgba_png

pytestmark = pytest.mark.timeout(420)

TTS = {"text": "Hello, and welcome.", "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}


def _drop_tts_job(inbox: Path, name: str, tts: dict = TTS) -> None:
    staging = inbox / f".{name}"
    staging.mkdir()
    make_rgba_png(staging / "face.png")
    doc = {"prompt": "A woman talks.", "cond_video": "face.png", "cond_audio": {}, "tts_audio": tts}
    (staging / "job.json").write_text(json.dumps(doc))
    os.rename(staging, inbox / name)


def test_a_tts_job_renders_through_the_daemon(tmp_path: Path, tiny_weights_dir: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir, weights)
    d = Daemon(tmp_path / "d", fake=False, weights_dir=weights)
    try:
        _drop_tts_job(d.inbox, "hello")
        d.start()
        d.wait_for(lambda: (j := d.job("hello")) and j["stage"] == "tts", 180, "the tts stage")
        job = d.wait_state("hello", ("done", "failed", "rejected"), timeout_s=300)
        assert job["state"] == "done", job
        sidecar = json.loads((d.outbox / "hello.json").read_text())
        assert sidecar["settings"]["tts_audio"] == {"text": TTS["text"], "human1_voice": "af_heart"}
        assert sidecar["settings"]["cond_audio"] == {} and "tts_s" in sidecar["timings_s"]
        with av.open(str(d.outbox / "hello.mp4")) as c:
            assert c.streams.audio[0].rate == 24000
        assert (weights / "Kokoro-82M" / "kokoro-v1_0.pth").is_file()
        # now the folder has voices: an unknown one is rejected at intake, naming the field
        _drop_tts_job(d.inbox, "nobody", {"text": "Hi.", "human1_voice": "zf_nobody"})
        job = d.wait_state("nobody", ("done", "failed", "rejected"), timeout_s=60)
        assert (job["state"], job["error_code"], job["error_field"]) == (
            "rejected",
            "bad_value",
            "tts_audio.human1_voice",
        ), job
        assert "af_heart" in job["error_message"]
    finally:
        d.stop()


def test_a_missing_tts_piece_fails_the_job_and_the_daemon_serves_on(
    tmp_path: Path, tiny_weights_dir: Path
) -> None:
    broken = tmp_path / "broken-site"
    (broken / "kokoro").mkdir(parents=True)
    (broken / "kokoro" / "__init__.py").write_text("raise ImportError('kokoro is broken here')\n")
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights_dir, weights)
    d = Daemon(tmp_path / "d", fake=False, weights_dir=weights, env={"PYTHONPATH": str(broken)})
    try:
        _drop_tts_job(d.inbox, "text")
        d.start()
        job = d.wait_state("text", ("done", "failed", "rejected"), timeout_s=240)
        assert (job["state"], job["error_code"]) == ("failed", "tts_unavailable"), job
        assert "kokoro" in job["error_message"]
        staging = d.inbox / ".speech"
        make_job_bundle(staging, duration_s=1.2, seed=1)
        os.rename(staging, d.inbox / "speech")
        assert d.wait_state("speech", ("done", "failed", "rejected"), timeout_s=240)["state"] == "done"
        d.assert_alive()
    finally:
        d.stop()
