"""daemon/outbox.py: two-phase publication (staged, then linked, sidecar last), names never
overwritten, error JSONs at reserved names, failed originals kept."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from daemon.outbox import Outbox, is_same_file


def _staged(outbox: Outbox, job_id: str) -> tuple[Path, Path]:
    staging = outbox.staging_dir(job_id)
    video = staging / f"{job_id}.mp4"
    poster = staging / f"{job_id}.jpg"
    video.write_bytes(b"video-" + job_id.encode())
    poster.write_bytes(b"jpg")
    return video, poster


def test_publication_is_staged_then_committed_sidecar_last(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    video, poster = _staged(outbox, "j1")
    published = outbox.stage_publication(
        job_id="j1", name="alice", video=video, poster=poster, sidecar={"job_id": "j1"}
    )
    out = tmp_path / "out"
    assert (published.base, published.video, published.poster, published.sidecar) == (
        "alice",
        out / "alice.mp4",
        out / "alice.jpg",
        out / "alice.json",
    )
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == []  # phase 1: nothing visible
    staged = json.loads((video.parent / "sidecar.json").read_text())
    assert staged == {
        "job_id": "j1",
        "outputs": {"video": str(out / "alice.mp4"), "poster": str(out / "alice.jpg")},
    }
    assert set(published.identity) == {"video", "poster", "sidecar"}
    assert published.identity["video"]["sha256"] == hashlib.sha256(b"video-j1").hexdigest()

    outbox.commit_publication(published, staging=video.parent, job_id="j1")
    outbox.commit_publication(published, staging=video.parent, job_id="j1")  # idempotent (recovery)
    assert published.video.read_bytes() == b"video-j1"
    assert os.path.samefile(published.video, video) and os.path.samefile(published.poster, poster)
    assert json.loads(published.sidecar.read_text()) == staged
    assert is_same_file(published.sidecar, published.identity["sidecar"])
    outbox.finish_publication("j1")
    assert not (outbox.partial / "j1").exists() and published.video.read_bytes() == b"video-j1"


def test_names_are_never_overwritten(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    (tmp_path / "out" / "alice.mp4").write_bytes(b"someone else's")
    (tmp_path / "out" / "alice-2.error.json").write_text("{}")
    video, poster = _staged(outbox, "j2")
    published = outbox.stage_publication(job_id="j2", name="alice", video=video, poster=poster, sidecar={})
    assert published.base == "alice-3"
    assert outbox.reserve_base("alice", taken={"alice-3"}) == "alice-4"
    # the sidecar's final name is taken after staging: nothing of ours stays, the stranger's file stays
    (tmp_path / "out" / "alice-3.json").write_text('{"job_id": "stranger"}')
    with pytest.raises(FileExistsError):
        outbox.commit_publication(published, staging=video.parent, job_id="j2")
    assert not published.video.exists() and published.poster is not None and not published.poster.exists()
    assert (tmp_path / "out" / "alice-3.json").read_text() == '{"job_id": "stranger"}'
    assert (tmp_path / "out" / "alice.mp4").read_bytes() == b"someone else's"
    assert video.read_bytes() == b"video-j2"  # still staged, for a retry


def test_write_error_at_writes_the_reserved_name_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    path = tmp_path / "out" / "alice.error.json"
    assert outbox.write_error_at(path, {"code": "x", "job_id": "j3"}) == path
    assert json.loads(path.read_text()) == {"code": "x", "job_id": "j3"}
    with pytest.raises(FileExistsError):  # a name taken meanwhile is never replaced
        outbox.write_error_at(path, {"code": "y"})
    assert json.loads(path.read_text())["code"] == "x"
    assert list(outbox.partial.iterdir()) == []  # no temporary file left behind


def test_keep_originals_moves_or_copies(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.json").write_text("{}")
    (src / "shared.wav").write_bytes(b"w")
    kept = outbox.keep_originals(
        "bob", [(src / "a.json", "a.json", True), (src / "shared.wav", "shared.wav", False)]
    )
    assert kept == tmp_path / "out" / "failed" / "bob"
    assert (kept / "a.json").exists() and not (src / "a.json").exists()
    assert (kept / "shared.wav").exists() and (src / "shared.wav").exists()
    assert outbox.keep_originals("bob", []).name == "bob-2"


def test_clean_staging_removes_leftovers(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    _staged(outbox, "old")
    _staged(outbox, "live")
    assert outbox.clean_staging(keep=["live"]) == ["old"]
    assert (outbox.partial / "live").exists()


def test_move_across_filesystems_appears_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from daemon import outbox as outbox_mod

    real_rename = os.rename
    calls = []

    def rename(src: object, dest: object) -> None:
        calls.append((src, dest))
        if len(calls) == 1:  # the first, direct rename: pretend the target is another filesystem
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dest)  # type: ignore[arg-type]

    src = tmp_path / "bundle"
    src.mkdir()
    (src / "a.wav").write_bytes(b"a")
    monkeypatch.setattr(os, "rename", rename)
    outbox_mod.move(src, tmp_path / "claimed")
    assert (tmp_path / "claimed" / "a.wav").read_bytes() == b"a" and not src.exists()
    assert calls[1][0] == tmp_path / ".claimed.copying"  # copied under a temporary name first


def test_a_loose_jobs_kept_originals_get_its_file_name_back(tmp_path: Path) -> None:
    from daemon.outbox import restore_loose_job_name

    kept = tmp_path / "failed" / "talk"
    kept.mkdir(parents=True)
    (kept / "job.json").write_text("{}")
    restore_loose_job_name(kept, "talk", str(tmp_path / "inbox" / "talk.json"))  # loose
    assert sorted(p.name for p in kept.iterdir()) == ["talk.json"]
    bundle = tmp_path / "failed" / "b.json"  # a bundle folder that happens to end in .json
    bundle.mkdir()
    (bundle / "job.json").write_text("{}")
    restore_loose_job_name(bundle, "b.json", str(tmp_path / "inbox" / "b.json"))
    assert sorted(p.name for p in bundle.iterdir()) == ["job.json"]
