"""A loose job's media folder (issue 13 item 2): its files are copied at the claim without ever
following a link, and a folder that became a bundle meanwhile is never taken from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.errors import JobRejected
from daemon.intake import Intake, copy_media_file, take_loose_files


def test_copy_media_file_copies_and_never_follows_a_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "inbox", tmp_path / "outside"
    (root / "ex" / "single").mkdir(parents=True)
    outside.mkdir()
    (root / "ex" / "single" / "1.wav").write_bytes(b"speech")
    (outside / "1.wav").write_bytes(b"secret")
    dest = tmp_path / "upload" / "ex" / "single" / "1.wav"
    copy_media_file(root, "ex/single/1.wav", dest)
    assert dest.read_bytes() == b"speech"
    assert os.stat(dest).st_ino != os.stat(root / "ex" / "single" / "1.wav").st_ino  # a copy
    assert (root / "ex" / "single" / "1.wav").read_bytes() == b"speech"  # never moved
    assert [p.name for p in dest.parent.iterdir()] == ["1.wav"]  # no partial file left
    # a folder on the way, or the file itself, swapped for a symlink: refused, nothing copied
    (root / "ex" / "link").symlink_to(outside)
    (root / "ex" / "alias.wav").symlink_to(outside / "1.wav")
    for rel in ("ex/link/1.wav", "ex/alias.wav"):
        target = tmp_path / "upload" / rel
        with pytest.raises(OSError):
            copy_media_file(root, rel, target)
        assert not target.exists()
    copy_media_file(root, "ex/gone.wav", tmp_path / "upload" / "ex" / "gone.wav")  # missing: skipped
    assert not (tmp_path / "upload" / "ex" / "gone.wav").exists()


def test_a_folder_that_got_its_job_json_before_the_claim_is_not_taken_from(intake: Intake) -> None:
    """Between the check and the claim the folder's job.json arrives: the loose job is refused
    (`path_escape`) at the claim and nothing of the folder is copied or moved."""
    inbox = intake.settings.inbox
    (inbox / "pending").mkdir()
    (inbox / "pending" / "face.png").write_bytes(b"png")
    job_file = inbox / "thief.json"
    job_file.write_text(json.dumps({"cond_video": "pending/face.png"}))
    (inbox / "pending" / "job.json").write_text("{}")
    upload = intake.settings.jobs_dir / "x" / "upload"
    upload.mkdir(parents=True)
    with pytest.raises(JobRejected) as caught:
        take_loose_files(inbox, job_file, upload, {"pending/face.png"}, shared=set())
    assert caught.value.code == "path_escape" and "bundle 'pending'" in caught.value.message
    assert sorted(p.name for p in (inbox / "pending").iterdir()) == ["face.png", "job.json"]
    assert sorted(p.name for p in upload.iterdir()) == ["job.json"]  # only the JSON: kept as original
