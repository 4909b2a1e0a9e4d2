"""daemon/inbox.py: job entries, temporary upload names, signatures, the watcher as a hint."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from daemon.inbox import (
    Watcher,
    has_temporary_files,
    is_litter,
    is_temporary,
    loose_media_names,
    loose_path_problem,
    scan,
    signature,
)
from daemon.intake import Intake


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
        "Thumbs.db",
        "desktop.ini",
        "face.png~",
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
    (tmp_path / "Thumbs.db").mkdir()  # litter is no job, file or folder
    (tmp_path / "Desktop.ini").write_text("[.ShellClassInfo]")
    (tmp_path / "erin.json~").write_text("{}")
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


@pytest.mark.parametrize(
    "litter",
    [
        ".DS_Store",
        "._face.png",
        "Thumbs.db",
        "THUMBS.DB",
        "ehthumbs.db",
        "desktop.ini",
        "Desktop.ini",
        "face.png~",
    ],
)
def test_os_and_editor_litter_does_not_keep_a_bundle_waiting(tmp_path: Path, litter: str) -> None:
    (tmp_path / "face.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / litter).write_bytes(b"x")
    (tmp_path / litter).write_bytes(b"x")
    assert is_litter(litter) and is_temporary(litter)
    assert not has_temporary_files(tmp_path)


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        (".voice.wav.AbC123", False),  # rsync's temporary file
        (".rsync-partial", True),
        (".~tmp~", True),  # rsync --temp-dir; ends with ~ but is no backup file
        ("voice.wav.part", False),
        ("x.ab12cd34.partial", False),
        ("big.mp4.filepart", False),
        ("a.tmp", False),
        ("dl.crdownload", False),
        (".syncthing.face.png.tmp", False),
        ("~syncthing~face.png.tmp", False),
        (".nfs000001", False),
        ("..DS_Store.AbC123", False),  # rsync's temporary for a .DS_Store
        (".face.png~.AbC123", False),  # rsync's temporary for a backup file
    ],
)
def test_transfer_temporaries_still_keep_a_bundle_waiting(tmp_path: Path, name: str, folder: bool) -> None:
    (tmp_path / "face.png").write_bytes(b"x")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    if folder:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(b"x")
    assert not is_litter(name)
    assert has_temporary_files(tmp_path)


def test_a_job_named_failed_is_a_job(tmp_path: Path) -> None:
    """Nothing uses an inbox/failed folder (failures go to outbox/failed/): no name is reserved."""
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed.json").write_text("{}")
    assert [(e.kind, e.name) for e in scan(tmp_path)] == [("bundle", "failed"), ("loose", "failed")]


def _example_json(inbox: Path, name: str = "single_example_image", **extra: object) -> Path:
    """The reference's example layout: `inbox/<name>.json` naming media under `examples/single/`."""
    doc = {
        "prompt": "A woman is talking.",
        "cond_video": "examples/single/ref_image.png",
        "cond_audio": {"person1": "examples/single/1.wav"},
        **extra,
    }
    path = inbox / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def _example_media(inbox: Path) -> Path:
    media = inbox / "examples" / "single"
    media.mkdir(parents=True)
    (media / "ref_image.png").write_bytes(b"png")
    (media / "1.wav").write_bytes(b"wav")
    return media


def test_a_loose_jobs_media_folder_is_not_a_bundle(tmp_path: Path) -> None:
    _example_media(tmp_path)
    _example_json(tmp_path)
    entries = scan(tmp_path)
    assert [(e.kind, e.name) for e in entries] == [("loose", "single_example_image")]
    assert entries[0].media == {"examples/single/ref_image.png", "examples/single/1.wav"}
    # however many other files the folder holds
    (tmp_path / "examples" / "multi").mkdir()
    (tmp_path / "examples" / "multi" / "1-man.wav").write_bytes(b"wav")
    assert [e.name for e in scan(tmp_path)] == ["single_example_image"]


def test_a_folder_no_loose_job_names_is_still_a_bundle_upload(tmp_path: Path) -> None:
    _example_media(tmp_path)
    (tmp_path / "other.json").write_text(
        json.dumps({"cond_video": "face.png", "cond_audio": {"person1": "v.wav"}})
    )
    (tmp_path / "pending").mkdir()  # a bundle whose upload has only begun
    assert [(e.kind, e.name) for e in scan(tmp_path)] == [
        ("bundle", "examples"),
        ("loose", "other"),
        ("bundle", "pending"),
    ]


def test_a_named_folder_with_job_json_or_a_symlink_stays_an_entry(tmp_path: Path) -> None:
    """A folder with job.json is a bundle, never a media folder (a loose job naming its files is
    rejected: `loose_path_problem`); a symlinked folder is an entry, rejected as a symlink."""
    _example_media(tmp_path)
    (tmp_path / "examples" / "job.json").write_text("{}")
    (tmp_path / "linked").symlink_to(tmp_path / "examples")
    (tmp_path / "two.json").write_text(json.dumps({"cond_video": "linked/single/ref_image.png"}))
    _example_json(tmp_path)
    names = [(e.kind, e.name) for e in scan(tmp_path)]
    assert names == [
        ("bundle", "examples"),
        ("bundle", "linked"),
        ("loose", "single_example_image"),
        ("loose", "two"),
    ]


def test_loose_path_problem_refuses_bundles_and_hidden_or_staging_names(tmp_path: Path) -> None:
    _example_media(tmp_path)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "job.json").write_text("{}")
    assert loose_path_problem(tmp_path, "face.png") is None
    assert loose_path_problem(tmp_path, "examples/single/1.wav") is None
    assert "bundle 'victim'" in str(loose_path_problem(tmp_path, "victim/voice.wav"))
    for rel in (
        ".face.png",
        "face.png.part",
        ".staging/voice.wav",
        "examples/.~tmp~/1.wav",
        "examples/.rsync-partial/1.wav",
        "examples/single/.1.wav.Xy12Ab",
    ):
        assert "hidden or temporary" in str(loose_path_problem(tmp_path, rel)), rel


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.wav", {"1.wav"}),
        ("./1.wav", {"1.wav"}),
        ("examples/single/1.wav", {"examples/single/1.wav"}),
        ("./examples//single/1.wav", {"examples/single/1.wav"}),
        ("examples\\single\\1.wav", {"examples/single/1.wav"}),
        (".staging/1.wav", set()),
        ("examples/.~tmp~/1.wav", set()),
        (".1.wav", set()),
        ("../outside.wav", set()),
        ("/etc/passwd.wav", set()),
        ("None", set()),
    ],
)
def test_loose_media_names_normalises_and_drops_escapes_and_hidden_names(
    tmp_path: Path, value: str, expected: set[str]
) -> None:
    job = tmp_path / "x.json"
    job.write_text(json.dumps({"cond_video": 3, "cond_audio": {"person1": value}}))
    assert loose_media_names(job) == expected
    job.write_text("{not json")
    assert loose_media_names(job) == set()


def _rows(intake: Intake) -> dict[str, tuple[str, str | None]]:
    states = ["waiting", "queued", "rejected", "cancelled"]
    return {
        row.name: (row.state, row.waiting_reason if row.state == "waiting" else row.error_message)
        for row in intake.ledger.jobs(states)
    }


def test_a_loose_job_waiting_for_media_in_a_subfolder_is_the_only_job(intake: Intake) -> None:
    inbox = intake.settings.inbox
    _example_media(inbox)
    (inbox / "examples" / "single" / "1.wav").unlink()  # still being uploaded
    _example_json(inbox)
    intake.scan_once()
    intake.scan_once()
    assert _rows(intake) == {
        "single_example_image": ("waiting", "incomplete upload: waiting for cond_audio.person1"),
    }
    assert (inbox / "examples" / "single" / "ref_image.png").exists()


def test_a_media_folder_that_arrived_before_its_json_is_dropped_as_no_job(intake: Intake) -> None:
    inbox = intake.settings.inbox
    _example_media(inbox)
    intake.scan_once()
    assert _rows(intake) == {"examples": ("waiting", "incomplete upload: no job.json yet")}
    _example_json(inbox)
    intake.scan_once()
    rows = _rows(intake)
    assert rows["examples"][0] == "cancelled" and "not a job" in str(rows["examples"][1])
    assert rows["single_example_image"][0] == "waiting"
    assert (inbox / "examples" / "single" / "1.wav").exists()


def test_a_rejected_loose_job_leaves_its_media_folder_in_place(intake: Intake) -> None:
    """The files of a media folder are never moved (the folder may be another client's bundle
    still being uploaded): a rejected loose job keeps only its JSON (and its loose files) as
    originals; once no loose job names the folder, it is a bundle candidate again."""
    inbox = intake.settings.inbox
    media = _example_media(inbox)
    _example_json(inbox, colour="red")  # an unknown key: rejected
    intake.scan_once()
    rows = _rows(intake)
    assert list(rows) == ["single_example_image"] and rows["single_example_image"][0] == "rejected"
    kept = intake.settings.outbox / "failed" / "single_example_image"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == ["single_example_image.json"]
    assert sorted(p.name for p in media.iterdir()) == ["1.wav", "ref_image.png"]
    intake.scan_once()
    assert _rows(intake)["examples"] == ("waiting", "incomplete upload: no job.json yet")


@pytest.mark.parametrize("folder", ["victim", ".staging-victim"])
def test_a_loose_job_naming_files_of_a_bundle_or_a_staged_folder_is_rejected(
    intake: Intake, folder: str
) -> None:
    inbox = intake.settings.inbox
    (inbox / folder).mkdir()
    for name in ("face.png", "voice.wav"):
        (inbox / folder / name).write_bytes(b"x")
    if folder == "victim":
        (inbox / folder / "job.json").write_text("{}")
    (inbox / "thief.json").write_text(
        json.dumps({"prompt": "p", "cond_video": f"{folder}/face.png", "cond_audio": {"person1": "x.wav"}})
    )
    intake.scan_once()
    thief = next(r for r in intake.ledger.jobs(["rejected"]) if r.name == "thief")
    assert thief.error_code == "path_escape" and f"{folder}/face.png" in str(thief.error_message)
    # nothing was taken: the staged folder as it was; the victim's files all went to its own job
    # (rejected here for its empty job.json, so they are kept as its originals)
    left = inbox / folder if folder != "victim" else intake.settings.outbox / "failed" / "victim"
    assert sorted(p.name for p in left.iterdir()) == sorted(
        ["face.png", "voice.wav", *(["job.json"] if folder == "victim" else [])]
    )


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


def test_plain_file_in_never_passes_through_a_symlink(tmp_path: Path) -> None:
    """A loose job naming `ex/link/secret.png`, with `ex/link` a symlink to a folder outside the
    inbox, must never have that outside file moved (claimed or kept as an original)."""
    from daemon.inbox import plain_file_in

    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "ex").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (inbox / "ex" / "link").symlink_to(outside)
    (inbox / "ex" / "real.png").write_bytes(b"x")
    (inbox / "ex" / "alias.png").symlink_to(inbox / "ex" / "real.png")
    assert plain_file_in(inbox, "ex/real.png")
    assert not plain_file_in(inbox, "ex/link/secret.png")
    assert not plain_file_in(inbox, "ex/alias.png")
    assert not plain_file_in(inbox, "ex/missing.png")
    assert not plain_file_in(inbox, "../outside/secret.png")
    assert not plain_file_in(inbox, "ex")  # a folder is not a file


def test_a_rejected_loose_job_never_moves_a_file_from_outside_the_inbox(
    intake: Intake, tmp_path: Path
) -> None:
    """`ex/link` is a symlink to a folder outside the inbox: the job is rejected (symlink) and the
    outside file stays where it is; only its JSON is kept (a media folder's files never move)."""
    inbox = intake.settings.inbox
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (inbox / "ex").mkdir()
    (inbox / "ex" / "link").symlink_to(outside)
    (inbox / "ex" / "1.wav").write_bytes(b"wav")
    (inbox / "evil.json").write_text(
        json.dumps({"prompt": "p", "cond_video": "ex/link/secret.png", "cond_audio": {"person1": "ex/1.wav"}})
    )
    intake.scan_once()
    assert _rows(intake)["evil"][0] == "rejected"
    assert (outside / "secret.png").read_bytes() == b"secret"
    kept = intake.settings.outbox / "failed" / "evil"
    assert not list(kept.rglob("secret.png"))
    # a media folder's files are never moved: only the JSON is kept, the folder stays put
    assert (kept / "evil.json").is_file() and not (kept / "ex").exists()
    assert (inbox / "ex" / "1.wav").is_file()
