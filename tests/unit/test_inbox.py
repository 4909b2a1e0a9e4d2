"""daemon/inbox.py: job entries, temporary upload names, signatures, the watcher as a hint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from daemon.inbox import Watcher, has_temporary_files, is_temporary, scan, signature


@pytest.mark.parametrize(
    "name",
    [
        ".face.png.Xy12ab",
        ".rsync-partial",
        ".~tmp~",
        "voice.wav.part",
        "x.ab12cd34.partial",
        "big.mp4.filepart",
        "a.tmp",
        "dl.crdownload",
        ".syncthing.face.png.tmp",
        "~syncthing~face.png.tmp",
        ".DS_Store",
        "._face.png",
        ".nfs000001",
        "job.json.TMP",
        "job.json.swp",
    ],
)
def test_temporary_names_are_ignored(name: str) -> None:
    assert is_temporary(name)


@pytest.mark.parametrize("name", ["face.png", "voice.WAV", "job.json", "alice", "my.job.json", "partial.png"])
def test_normal_names_are_not_temporary(name: str) -> None:
    assert not is_temporary(name)


def test_scan_finds_bundles_and_loose_jobs_only(tmp_path: Path) -> None:
    (tmp_path / "alice").mkdir()
    (tmp_path / "bob.json").write_text("{}")
    (tmp_path / "bob.png").write_bytes(b"x")
    (tmp_path / ".carol").mkdir()  # an upload tool's staging dir
    (tmp_path / "dave.json.part").write_text("{")
    (tmp_path / "failed").mkdir()
    entries = scan(tmp_path)
    assert [(e.kind, e.name) for e in entries] == [("bundle", "alice"), ("loose", "bob")]
    assert entries[0].job_file == tmp_path / "alice" / "job.json"
    assert entries[1].base_dir == tmp_path
    assert scan(tmp_path / "missing") == []


def test_temporary_files_inside_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "face.png").write_bytes(b"x")
    assert not has_temporary_files(tmp_path)
    (tmp_path / ".voice.wav.AbC123").write_bytes(b"x")
    assert has_temporary_files(tmp_path)


def test_signature_changes_with_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"1")
    before = signature([f, tmp_path / "missing"])
    f.write_bytes(b"12")
    assert signature([f, tmp_path / "missing"]) != before


def test_watcher_only_wakes(tmp_path: Path) -> None:
    wake = threading.Event()
    watcher = Watcher(tmp_path, wake)
    watcher.start()
    try:
        assert watcher.alive()
        (tmp_path / "job.json").write_text("{}")
        assert wake.wait(5.0)
    finally:
        watcher.stop()
    assert not watcher.alive()


def test_overflow_log_record_triggers_a_rescan(tmp_path: Path) -> None:
    import logging

    wake = threading.Event()
    watcher = Watcher(tmp_path, wake)
    watcher.start()
    try:
        wake.clear()
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")
        assert wake.is_set() and watcher.overflowed.is_set()
    finally:
        watcher.stop()
    time.sleep(0)
