"""The daemon renders speech shorter than one chunk (the tiny model's chunk: 33 frames, 1.32 s)
as one chunk cut to the speech, the same rule as `infinitetalk render`; below `min_audio_s` it
rejects with the one code for it, `audio_too_short`."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle

pytestmark = pytest.mark.timeout(300)


def test_short_speech_renders_cut_to_the_speech(tmp_path: Path, tiny_weights_dir: Path) -> None:
    d = Daemon(tmp_path, fake=False, weights_dir=tiny_weights_dir, config={"min_audio_s": 0.5})
    make_job_bundle(d.inbox / "hi", duration_s=0.8, seed=1)  # "Hi, I'm Anna." length: 20 frames
    make_job_bundle(d.inbox / "blip", duration_s=0.3, seed=2)
    try:
        d.start()
        hi = d.wait_state("hi", ("done", "failed", "rejected"), timeout_s=240)
        blip = d.wait_state("blip", ("done", "failed", "rejected"), timeout_s=60)
    finally:
        d.stop()
    assert hi["state"] == "done", hi
    with av.open(str(d.outbox / "hi.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20
        assert abs(float(c.duration) / 1e6 - 0.8) < 0.1
    assert json.loads((d.outbox / "hi.json").read_text())["frames"] == 20
    assert blip["state"] == "rejected" and blip["error_code"] == "audio_too_short", blip
    assert "at least 0.5 s" in blip["error_message"]
