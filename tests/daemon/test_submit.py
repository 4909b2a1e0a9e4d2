"""`infinitetalk submit`: a job is checked as the daemon will check it before anything is staged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.commands import submit
from daemon.jobs import InvalidJob, load_job
from tests.helpers.media import make_job_bundle, make_loose_job

ROOT = Path(__file__).resolve().parents[2]


def test_loose_job_with_media_in_subfolders_becomes_a_bundle(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    loose = make_loose_job(src, "talk", duration_s=1.0)
    doc = json.loads(loose.read_text())
    (src / "examples" / "single").mkdir(parents=True)
    for key in ("cond_video",):
        os.rename(src / doc[key], src / "examples" / "single" / doc[key])
        doc[key] = f"examples/single/{doc[key]}"
    loose.write_text(json.dumps(doc))
    inbox = tmp_path / "inbox"
    final = submit(loose, inbox)
    assert final == inbox / "talk" and sorted(p.name for p in inbox.iterdir()) == ["talk"]
    spec = load_job(final / "job.json")  # the staged bundle is a valid job on its own
    assert (final / "examples" / "single").is_dir() and spec.cond_video.startswith("examples/single/")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"cond_video": "../outside.png"}, "cond_video"),
        ({"cond_audio": {"person1": "missing.wav"}}, "missing.wav"),
        ({"sample_steps": 0}, "sample_steps"),
    ],
)
def test_a_bad_job_is_refused_and_nothing_is_staged(tmp_path: Path, change: dict, needle: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    loose = make_loose_job(src, "bad", duration_s=1.0)
    loose.write_text(json.dumps({**json.loads(loose.read_text()), **change}))
    inbox = tmp_path / "inbox"
    with pytest.raises(InvalidJob, match=needle):
        submit(loose, inbox)
    assert not inbox.exists() or list(inbox.iterdir()) == []


def test_the_command_exits_1_naming_the_problem(tmp_path: Path) -> None:
    bundle = make_job_bundle(tmp_path / "b", duration_s=1.0)
    doc = json.loads((bundle / "job.json").read_text())
    doc["cond_audio"] = {"person1": "nope.wav"}
    (bundle / "job.json").write_text(json.dumps(doc))
    conf = tmp_path / "it.toml"
    conf.write_text(f'inbox = "{tmp_path / "inbox"}"\nstate_dir = "{tmp_path / "var"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "submit", str(bundle), "--config", str(conf)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1 and "nope.wav" in proc.stderr, proc.stderr
    assert not (tmp_path / "inbox").exists() or list((tmp_path / "inbox").iterdir()) == []
