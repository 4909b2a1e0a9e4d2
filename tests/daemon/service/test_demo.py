"""`scripts/demo --once`: the README's first command renders the bundled example into the outbox."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import av
import pytest
from PIL import Image

from tests.helpers.proc import ROOT, free_port


@pytest.mark.timeout(600)
def test_demo_once_renders_the_example(tmp_path: Path) -> None:
    config = tmp_path / "demo.toml"
    config.write_text(
        f'inbox = "inbox"\noutbox = "outbox"\nstate_dir = "var"\nweights_dir = "weights"\n'
        f"settle_s = 0.3\nrescan_s = 1.0\n[dashboard]\nport = {free_port()}\n"
    )
    env = {**os.environ, "INFINITETALK_CONFIG": str(config)}
    out = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=570,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "TINY RANDOM-WEIGHT" in out.stderr
    video = tmp_path / "outbox" / "example.mp4"
    with av.open(str(video)) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.audio
        assert abs(float(c.duration) / 1e6 - 4.0) < 0.1
    sidecar = json.loads((tmp_path / "outbox" / "example.json").read_text())
    assert sidecar["state"] == "done" and sidecar["settings"]["seed"] == 42
    claimed = Path(sidecar["source"]).name == "example"
    assert claimed
    # the example was made in code: an odd-size RGBA PNG and a 44.1 kHz stereo .WAV
    inputs = tmp_path / "var" / "jobs" / sidecar["job_id"] / "input"
    png = Image.open(inputs / "portrait.png")
    assert png.mode == "RGBA" and png.size[0] % 2 == 1
    with av.open(str(inputs / "speech.WAV")) as c:
        assert c.streams.audio[0].rate == 44100 and c.streams.audio[0].channels == 2
