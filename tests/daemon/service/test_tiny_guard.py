"""No silent noise model: without weights `infinitetalk daemon` and `infinitetalk render` exit 78
naming the folder and what is missing, unless `allow_tiny_model = true` / `--allow-tiny`; and
`render` checks the job with the daemon's own probes before it loads any model."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle
from tests.helpers.proc import ROOT, infinitetalk

pytestmark = pytest.mark.timeout(300)
EX_CONFIG = 78


def _render(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("INFINITETALK_CONFIG", None)
    return infinitetalk("render", *args, cwd=cwd, env=env, timeout_s=240)


@pytest.mark.parametrize("made", [True, False], ids=["empty", "mistyped"])
def test_daemon_without_weights_exits_78_naming_what_is_missing(tmp_path: Path, made: bool) -> None:
    weights = tmp_path / ("weights" if made else "wieghts")
    if made:
        weights.mkdir()
    d = Daemon(tmp_path, weights_dir=weights)  # the fake pipeline: no model is ever needed here
    d.start()
    assert d.wait_exit(60) == EX_CONFIG
    log = d.log.read_text()
    assert f"weights_dir {weights} holds no weights" in log
    if made:  # the `infinitetalk weights check` report
        assert "MISSING  Wan2.1-I2V-14B-480P/config.json" in log
    else:
        assert f"weights folder {weights} does not exist" in log
    assert "allow_tiny_model = true" in log
    assert not (d.state / "tiny-weights").exists()  # no noise model written
    assert not (d.state / "ledger.sqlite3").exists()  # refused before anything was touched


def test_allow_tiny_model_renders_with_the_tiny_model(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    d = Daemon(tmp_path, weights_dir=weights, config={"allow_tiny_model": True})
    make_job_bundle(d.inbox / "hello", duration_s=1.0, seed=1)
    try:
        d.start()
        job = d.wait_state("hello", ("done", "failed", "rejected"), timeout_s=120)
    finally:
        d.stop()
    assert job["state"] == "done", job
    assert "TINY RANDOM-WEIGHT" in d.log.read_text()
    assert (d.state / "tiny-weights" / "tiny.json").is_file()


def test_allow_tiny_flag_of_the_daemon(tmp_path: Path) -> None:
    d = Daemon(tmp_path, weights_dir=tmp_path / "none")
    printed = d.cli("daemon", "--print-config", "--allow-tiny")
    assert printed.returncode == 0 and "allow_tiny_model = true" in printed.stdout
    assert "allow_tiny_model = false" in d.cli("daemon", "--print-config").stdout


def test_render_without_weights_exits_78(tmp_path: Path) -> None:
    bundle = make_job_bundle(tmp_path / "hello", duration_s=1.0, sample_steps=1)
    proc = _render(str(bundle / "job.json"), cwd=tmp_path)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert "weights_dir weights holds no weights" in proc.stderr and "--allow-tiny" in proc.stderr
    assert "weights folder weights does not exist" in proc.stderr
    assert not (tmp_path / "var").exists() and not (tmp_path / "hello.mp4").exists()


def _truncate_wav(bundle: Path) -> None:
    wav = next(bundle.glob("*.WAV"))
    data = wav.read_bytes()
    wav.write_bytes(data[: len(data) // 2])  # the data chunk declares twice what is left


def test_render_checks_the_media_before_loading_the_model(tmp_path: Path, tiny_weights_dir: Path) -> None:
    bundle = make_job_bundle(tmp_path / "cut", duration_s=1.0, sample_steps=1)
    _truncate_wav(bundle)
    t0 = time.monotonic()
    proc = _render(str(bundle / "job.json"), "--weights", str(tiny_weights_dir), cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert "[bad_media] cond_audio.person1" in proc.stderr and "truncated upload" in proc.stderr
    assert "loading the model" not in proc.stderr
    print(f"bad WAV reported in {elapsed:.1f} s (a subprocess, imports included)")
    assert elapsed < 20  # the model load alone is longer on this machine; minutes on the real one


def test_render_rejects_speech_below_min_audio_s_with_the_daemons_code(tmp_path: Path) -> None:
    bundle = make_job_bundle(tmp_path / "blip", duration_s=0.2, sample_steps=1)
    proc = _render(str(bundle / "job.json"), cwd=tmp_path)  # no weights either: the job comes first
    assert proc.returncode == 2, proc.stderr
    assert "[audio_too_short] cond_audio.person1" in proc.stderr and "0.5 s" in proc.stderr


def test_render_renders_speech_shorter_than_a_chunk(tmp_path: Path, tiny_weights_dir: Path) -> None:
    import av

    bundle = make_job_bundle(tmp_path / "hi", duration_s=0.8, sample_steps=1, seed=3)
    proc = _render(str(bundle / "job.json"), "--weights", str(tiny_weights_dir), "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with av.open(str(tmp_path / "hi.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 20  # 0.8 s at 25 fps: cut to the speech
