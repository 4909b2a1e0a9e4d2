"""Issue 13, outbox / ledger / lock holes, on real files, real SQLite and real locks.

- disk-full errors are one class (`daemon.errors.is_disk_full`): ENOSPC, EDQUOT, shutil.Error
  wrapping them, SQLite's SQLITE_FULL, chained exceptions;
- a publication whose link fails (any errno) leaves nothing in the outbox and keeps its name;
- `delete` / retention touch only files proven to be the job's, never a newer job's file that
  took a name freed by hand (an inode number freed is soon reused: the content is the proof);
- the single-instance lock is an flock on the state directory: deleting `daemon.lock` breaks
  nothing;
- the ledger's path changing under the open connection is noticed (`Ledger.check_file`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon.control import apply_request, owns_output, remove_outputs
from daemon.errors import DaemonLocked, LedgerLost, is_disk_full
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox, Published, identify, is_same_file
from daemon.retention import notice_removed_outputs
from daemon.supervisor import acquire_lock, lock_is_held

# ---------------------------------------------------------------------------- disk full, as a class


def _copytree_error(tmp_path: Path, code: int) -> shutil.Error:
    """The shutil.Error copytree raises when copying a file fails with `code` (its exact form:
    a list of (src, dst, str(OSError)))."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.wav").write_bytes(b"x")

    def failing_copy(s: str, d: str, **_: Any) -> str:
        raise OSError(code, os.strerror(code), d)

    try:
        shutil.copytree(src, dst, copy_function=failing_copy)
    except shutil.Error as e:
        return e
    raise AssertionError("copytree did not fail")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_recognised_in_every_form(tmp_path: Path, code: int) -> None:
    assert is_disk_full(OSError(code, os.strerror(code)))
    wrapped = _copytree_error(tmp_path, code)
    assert isinstance(wrapped, OSError) and wrapped.errno is None  # what defeated errno == 28
    assert is_disk_full(wrapped)
    try:
        try:
            raise OSError(code, os.strerror(code))
        except OSError as e:
            raise RuntimeError("publishing failed") from e
    except RuntimeError as chained:
        assert is_disk_full(chained)


def test_sqlite_full_is_disk_full(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite3")
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError) as caught:
        for _ in range(100):
            conn.execute("INSERT INTO t VALUES (?)", (b"\0" * 4096,))
    assert is_disk_full(caught.value)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.EROFS])
def test_other_errors_are_not_disk_full(tmp_path: Path, code: int) -> None:
    assert not is_disk_full(OSError(code, os.strerror(code)))
    assert not is_disk_full(_copytree_error(tmp_path, code))
    assert not is_disk_full(sqlite3.OperationalError("attempt to write a readonly database"))


# ---------------------------------------------------------------------------- publication


def _stage(
    outbox: Outbox, job_id: str, content: bytes, name: str = "clip", mtime_ns: int | None = None
) -> tuple[Published, Path]:
    staging = outbox.staging_dir(job_id)
    video = staging / f"{job_id}.mp4"
    video.write_bytes(content)
    if mtime_ns is not None:
        os.utime(video, ns=(mtime_ns, mtime_ns))
    (staging / f"{job_id}.jpg").write_bytes(b"jpg-" + job_id.encode())
    published = outbox.stage_publication(
        job_id=job_id, name=name, video=video, poster=staging / f"{job_id}.jpg", sidecar={"job_id": job_id}
    )
    return published, staging


def _visible(outbox: Outbox) -> list[str]:
    return sorted(p.name for p in outbox.root.iterdir() if p.is_file())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMLINK, errno.EPERM])
@pytest.mark.parametrize("failing", [1, 2, 3], ids=["video", "poster", "sidecar"])
def test_a_failed_link_leaves_nothing_and_keeps_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, failing: int
) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    published, staging = _stage(outbox, "j1", b"video-1")
    real_link = os.link
    calls = []

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(dst)
        if len(calls) == failing:
            raise OSError(code, os.strerror(code), str(dst))
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(OSError) as caught:
        outbox.commit_publication(published, staging=staging, job_id="j1")
    assert caught.value.errno == code
    assert _visible(outbox) == []  # no orphan clip.mp4 / clip.jpg without a sidecar
    monkeypatch.setattr(os, "link", real_link)
    again = outbox.stage_publication(
        job_id="j1",
        name="clip",
        video=staging / "j1.mp4",
        poster=staging / "j1.jpg",
        sidecar={"job_id": "j1"},
    )
    assert again.base == "clip"  # the retry takes the same name, not clip-2
    outbox.commit_publication(again, staging=staging, job_id="j1")
    assert _visible(outbox) == ["clip.jpg", "clip.json", "clip.mp4"]


def test_undo_takes_back_only_links_to_the_staged_files(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    published, staging = _stage(outbox, "j1", b"video-1")
    outbox.commit_publication(published, staging=staging, job_id="j1")
    published.sidecar.unlink()
    published.sidecar.write_text('{"job_id": "someone else"}')  # not a link to our staged file
    assert outbox.undo_publication(published, staging=staging, job_id="j1") == []
    assert _visible(outbox) == ["clip.json"]


# ---------------------------------------------------------------------------- delete proves ownership


def _published_row(
    ledger: Ledger, outbox: Outbox, name: str, content: bytes, mtime_ns: int | None = None
) -> JobRow:
    row = ledger.insert_job(name=name, source=f"/in/{name}", state="waiting")
    ledger.admit(row.id, max_queued=20)
    ledger.claim_next(max_running=3, job_id=row.id)
    published, staging = _stage(outbox, row.id, content, name=name, mtime_ns=mtime_ns)
    ledger.set_columns(
        row.id,
        output_video=str(published.video),
        output_poster=str(published.poster),
        output_json=str(published.sidecar),
        outputs_identity=published.identity_json(),
    )
    outbox.commit_publication(published, staging=staging, job_id=row.id)
    outbox.finish_publication(row.id)
    return ledger.transition(row.id, "running", "done", finished_at=1.0)


def test_delete_of_an_old_job_never_removes_a_newer_jobs_files(tmp_path: Path) -> None:
    from daemon.config import load_settings

    (tmp_path / "c.toml").write_text("")
    settings = load_settings(tmp_path / "c.toml", environ={})
    ledger = Ledger(settings.ledger_path)
    outbox = Outbox(settings.outbox)
    outbox.ensure()
    old = _published_row(ledger, outbox, "talk", b"A" * 4096)
    old_video = old.identities["video"]
    for p in list(outbox.root.iterdir()):
        if p.is_file():
            p.unlink()  # removed by hand: the name is free again
    # the worst case: same size and mtime, and the freed inode number is often given to the new file
    new = _published_row(ledger, outbox, "talk", b"B" * 4096, mtime_ns=old_video["mtime_ns"])
    assert Path(str(new.output_video)) == Path(str(old.output_video))
    old, new = ledger.get(old.id), ledger.get(new.id)
    assert not owns_output(old, "video", str(old.output_video))
    assert owns_output(new, "video", str(new.output_video))
    assert remove_outputs(old).removed == ()
    out = apply_request(settings, ledger, outbox, "delete", old.id)
    assert out.ok, out
    assert _visible(outbox) == ["talk.jpg", "talk.json", "talk.mp4"]
    assert Path(str(new.output_video)).read_bytes() == b"B" * 4096
    assert json.loads(Path(str(new.output_json)).read_text())["job_id"] == new.id
    # the newer job's own delete removes exactly its files
    assert apply_request(settings, ledger, outbox, "delete", new.id).ok
    assert _visible(outbox) == []


def test_a_name_taken_again_marks_the_old_job_deleted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    outbox = Outbox(tmp_path / "out")
    outbox.ensure()
    old = _published_row(ledger, outbox, "talk", b"A" * 100)
    assert notice_removed_outputs(ledger) == []
    for p in list(outbox.root.iterdir()):
        if p.is_file():
            p.unlink()
    new = _published_row(ledger, outbox, "talk", b"BB" * 100)
    assert notice_removed_outputs(ledger) == [old.id]  # its video's name exists, but is not its own
    assert ledger.get(new.id).deleted_at is None
    events = [r[0] for r in ledger.conn.execute("SELECT data_json FROM events WHERE kind = 'deleted'")]
    assert "another file" in events[0]


def test_identity_is_device_inode_size_mtime_and_content(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    ident = identify(f)
    assert is_same_file(f, ident)
    link = tmp_path / "l"
    link.symlink_to(f)
    assert not is_same_file(link, ident)  # never through a symlink
    with open(f, "r+b") as h:  # same inode, size and (restored) mtime; other content
        h.write(b"xyz")
    os.utime(f, ns=(ident["mtime_ns"], ident["mtime_ns"]))
    assert is_same_file(f, ident, check_hash=False) and not is_same_file(f, ident)


# ---------------------------------------------------------------------------- the lock


def test_the_lock_survives_deleting_daemon_lock(tmp_path: Path) -> None:
    state = tmp_path / "var"
    fd = acquire_lock(state)
    try:
        (state / "daemon.lock").unlink()
        assert lock_is_held(state)
        with pytest.raises(DaemonLocked):
            acquire_lock(state)  # a second open file description: flock conflicts
    finally:
        os.close(fd)
    assert not lock_is_held(state)
    os.close(acquire_lock(state))


# ---------------------------------------------------------------------------- the ledger file


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_the_ledger_file_changing_under_the_connection_is_noticed(tmp_path: Path, how: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    ledger.insert_job(name="kept", source="/in/kept", state="waiting")
    ledger.check_file()
    for p in tmp_path.glob("ledger.sqlite3*"):
        p.unlink()
    if how == "replaced":
        Ledger(path).close()
    with pytest.raises(LedgerLost, match=how):
        ledger.check_file()
    saved = ledger.rescue(tmp_path / "rescued.sqlite3")
    ledger.close()
    rescued = Ledger(saved)
    assert [j.name for j in rescued.jobs()] == ["kept"]
    rescued.close()
