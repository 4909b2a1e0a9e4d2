"""Loose jobs with media in a subfolder (issue 13 item 2, and the reference's own example layout),
end to end on the real daemon with the tiny model: the reference layout renders and its folder
stays; a loose JSON naming files of a bundle (a folder with job.json) or of a hidden / staging
folder is rejected at once; one naming files of a folder whose job.json has not arrived yet gets
a copy, and that bundle still renders, whole, once its job.json arrives."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle

pytestmark = pytest.mark.timeout(420)

AUDIO_S = 1.6


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _loose(inbox: Path, name: str, video: str, audio: str, **extra: object) -> None:
    doc = {"prompt": f"{name} is talking.", "cond_video": video, "cond_audio": {"person1": audio}, **extra}
    (inbox / f"{name}.json").write_text(json.dumps(doc))


@pytest.fixture()
def tiny_daemon(tmp_path: Path, tiny_weights_dir: Path) -> Iterator[Daemon]:
    # long enough that the bundle still waiting for its job.json is not rejected meanwhile
    d = Daemon(tmp_path, fake=False, weights_dir=tiny_weights_dir, config={"incomplete_timeout_s": 900})
    yield d
    d.stop()


def test_loose_media_folders_render_and_bundles_are_never_taken(tiny_daemon: Daemon) -> None:
    d = tiny_daemon
    inbox = d.inbox

    # the reference's layout: inbox/single_example_image.json naming examples/single/...
    src = d.root / "src-example"
    make_job_bundle(src, duration_s=AUDIO_S, media_seed=1, job_json=False)
    media = inbox / "examples" / "single"
    media.mkdir(parents=True)
    (src / "face.png").rename(media / "ref_image.png")
    (src / "voice.WAV").rename(media / "1.WAV")
    _loose(inbox, "single_example_image", "examples/single/ref_image.png", "examples/single/1.WAV")
    example_files = _hashes(inbox / "examples")

    # a bundle with job.json, and a thief naming its files
    staged = inbox / ".stage-victim"
    make_job_bundle(staged, duration_s=AUDIO_S, media_seed=2, seed=2)
    os.rename(staged, inbox / "victim")
    victim_files = _hashes(inbox / "victim")
    _loose(inbox, "thief", "victim/face.png", "victim/voice.WAV")

    # a bundle still being uploaded (no job.json yet), and a thief naming its files
    pending = inbox / "pending"
    make_job_bundle(pending, duration_s=AUDIO_S, media_seed=3, seed=3)
    pending_json = (pending / "job.json").read_bytes()
    (pending / "job.json").unlink()
    pending_files = _hashes(pending)
    _loose(inbox, "copier", "pending/face.png", "pending/voice.WAV")

    # an upload staged under a dot-name, and a path through a staging folder of a media folder
    make_job_bundle(inbox / ".uploading", duration_s=AUDIO_S, media_seed=4, seed=4)
    uploading_files = _hashes(inbox / ".uploading")
    _loose(inbox, "thief-staged", ".uploading/face.png", ".uploading/voice.WAV")
    (inbox / "examples" / ".~tmp~").mkdir()
    os.link(media / "1.WAV", inbox / "examples" / ".~tmp~" / "1.WAV")
    _loose(inbox, "thief-tmp", "examples/single/ref_image.png", "examples/.~tmp~/1.WAV")

    d.start()
    for name, path in (("thief", "victim/face.png"), ("thief-staged", ".uploading/face.png")):
        job = d.wait_state(name, ("rejected", "done", "failed"), timeout_s=120)
        assert job["state"] == "rejected" and job["error_code"] == "path_escape", job
        assert path in job["error_message"]
    job = d.wait_state("thief-tmp", ("rejected", "done", "failed"), timeout_s=120)
    assert job["error_code"] == "path_escape" and ".~tmp~" in job["error_message"], job

    final = ("done", "failed", "rejected")
    example = d.wait_state("single_example_image", final, timeout_s=300)
    assert example["state"] == "done", example
    assert json.loads(example["input_hashes_json"]) == {
        f"examples/{rel}": digest for rel, digest in example_files.items()
    }
    assert (d.outbox / "single_example_image.mp4").stat().st_size > 0
    victim = d.wait_state("victim", final, timeout_s=300)
    assert victim["state"] == "done", victim
    assert json.loads(victim["input_hashes_json"]) == {
        k: v for k, v in victim_files.items() if k != "job.json"
    }
    copier = d.wait_state("copier", final, timeout_s=300)
    assert copier["state"] == "done", copier
    assert json.loads(copier["input_hashes_json"]) == {f"pending/{k}": v for k, v in pending_files.items()}

    # nothing of the folders was moved: the examples folder stays, the uploads are intact
    assert {k: v for k, v in _hashes(inbox / "examples").items() if ".~tmp~" not in k} == example_files
    assert _hashes(pending) == pending_files
    assert _hashes(inbox / ".uploading") == uploading_files

    # the upload finishes: the bundle is taken whole and renders
    (pending / ".job.json.part").write_bytes(pending_json)
    os.rename(pending / ".job.json.part", pending / "job.json")
    late = d.wait_state("pending", final, timeout_s=300)
    assert late["state"] == "done", late
    assert json.loads(late["input_hashes_json"]) == pending_files
    assert (d.outbox / "pending.mp4").stat().st_size > 0
