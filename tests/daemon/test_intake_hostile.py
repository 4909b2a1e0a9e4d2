"""Hostile uploads against intake itself (issue 13, round 2): real files, a real SQLite ledger, the
real decoders; no daemon process (tests/daemon/reliability/test_hostile_intake.py runs that)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from daemon.config import settings_from_mapping
from daemon.inbox import BadBundle, loose_media_names, scan, walk_bundle
from daemon.intake import Intake, claimed_inputs, move_upload, remove_tree, wav_size_unknown
from daemon.jobs import InvalidJob, json_too_deep, parse_job, read_regular, sha256_file
from daemon.policy import Failure, InputChanged, classify
from daemon.runner import verify_inputs
from tests.helpers.media import LATIN1_TAG, add_wav_tags, make_job_bundle, make_mp4, make_wav


@pytest.fixture()
def intake_settings() -> dict[str, object]:
    """The `intake` fixture's settings (tests/daemon/conftest.py): short speech, slow streams."""
    return {"settle_s": 0.0, "max_audio_s": 3.0, "stream_settle_s": 3600.0}


def _settle(intake: Intake, rounds: int = 40) -> dict[str, object]:
    """Scan until no job is waiting on a probe (the probe runs in a background thread)."""
    for _ in range(rounds):
        intake.scan_once()
        busy = ("checking media", "checking upload")
        if not any(r.waiting_reason in busy for r in intake.ledger.jobs(["waiting"])):
            break
        threading.Event().wait(0.05)
    states = ["waiting", "queued", "rejected", "cancelled"]
    return {row.name: row for row in intake.ledger.jobs(states)}


def _bundle(intake: Intake, name: str, *, duration_s: float = 1.0, seed: int = 0) -> Path:
    staged = intake.settings.inbox / f".{name}"
    make_job_bundle(staged, duration_s=duration_s, media_seed=seed, image_size=(48, 40))
    os.rename(staged, intake.settings.inbox / name)
    return intake.settings.inbox / name


# ---------------------------------------------------------------- 1: what is rendered was claimed


def test_the_claim_copies_into_a_private_folder_the_uploader_cannot_reach(intake: Intake) -> None:
    bundle = _bundle(intake, "b")
    held = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)  # a shell whose cwd is the bundle
    try:
        original = {n: sha256_file(bundle / n) for n in ("face.png", "voice.WAV")}
        inode = os.stat(bundle).st_ino
        rows = _settle(intake)
        row = rows["b"]
        assert row.state == "queued", (row.state, row.waiting_reason, row.error_message)
        job_dir = Path(str(row.job_dir))
        input_dir = job_dir / "input"
        assert os.stat(input_dir).st_ino != inode  # the daemon's own copy, not the uploader's folder
        assert stat.S_IMODE(os.stat(job_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(intake.settings.jobs_dir).st_mode) == 0o700
        assert not (job_dir / "upload").exists()
        # the uploader's folder (still reachable through `held`) no longer holds anything of the job
        with pytest.raises(FileNotFoundError):
            os.symlink("/etc/passwd", "voice.WAV", dir_fd=held)
        assert json.loads(str(row.input_hashes_json)) == original
        inputs = claimed_inputs(row.input_hashes_json, input_dir)
        verify_inputs(inputs)  # what the worker checks before each attempt
        (input_dir / "voice.WAV").unlink()
        (input_dir / "voice.WAV").symlink_to(input_dir / "face.png")
        with pytest.raises(InputChanged) as caught:
            verify_inputs(inputs)
        assert classify(caught.value) == Failure(code="input_changed", transient=False)
    finally:
        os.close(held)


# ---------------------------------------------------------------- 2: loose jobs never take a bundle's files


@pytest.mark.parametrize(
    "where", ["victim/voice.WAV", ".staging-victim/voice.WAV", "media/.voice.WAV", "media/.~tmp~/voice.WAV"]
)
def test_a_loose_job_cannot_take_files_of_a_bundle_or_a_staged_folder(intake: Intake, where: str) -> None:
    inbox = intake.settings.inbox
    folder = where.split("/")[0]
    make_job_bundle(inbox / folder, duration_s=1.0, image_size=(48, 40))
    if folder == "media":  # a plain media folder, but the path has a hidden or staging name in it
        (inbox / folder / "job.json").unlink()
        (inbox / where).parent.mkdir(exist_ok=True)
        os.link(inbox / folder / "voice.WAV", inbox / where)
    (inbox / "thief.json").write_text(
        json.dumps({"prompt": "p", "cond_video": f"{folder}/face.png", "cond_audio": {"person1": where}})
    )
    before = {p.name: sha256_file(p) for p in (inbox / folder).iterdir() if p.is_file()}
    rows = _settle(intake)
    thief = rows["thief"]
    assert thief.state == "rejected" and thief.error_code == "path_escape"  # type: ignore[attr-defined]
    assert where in str(thief.error_message)  # type: ignore[attr-defined]
    if folder == "victim":  # the victim's own job takes its files, all of them
        victim = rows["victim"]
        assert victim.state == "queued"  # type: ignore[attr-defined]
        input_dir = Path(str(victim.job_dir)) / "input"  # type: ignore[attr-defined]
        assert {p.name: sha256_file(p) for p in input_dir.iterdir()} == before
    else:
        assert {p.name: sha256_file(p) for p in (inbox / folder).iterdir() if p.is_file()} == before


def test_a_loose_job_naming_a_folder_without_job_json_gets_a_copy_and_the_bundle_still_renders(
    intake: Intake,
) -> None:
    """A folder without job.json is a media folder while a loose job names it: its files are
    copied at the claim, never moved, so when it was really a bundle whose job.json had not
    arrived yet, that job is still taken whole once job.json arrives."""
    inbox = intake.settings.inbox
    pending = inbox / "pending"
    make_job_bundle(pending, duration_s=1.0, image_size=(48, 40))
    job_json = (pending / "job.json").read_bytes()
    (pending / "job.json").unlink()  # a bundle still being uploaded
    (inbox / "thief.json").write_text(
        json.dumps(
            {"prompt": "p", "cond_video": "pending/face.png", "cond_audio": {"person1": "pending/voice.WAV"}}
        )
    )
    before = {p.name: (sha256_file(p), os.stat(p).st_ino) for p in pending.iterdir()}
    rows = _settle(intake)
    thief = rows["thief"]
    assert thief.state == "queued", (thief.state, thief.error_message)  # type: ignore[attr-defined]
    input_dir = Path(str(thief.job_dir)) / "input"  # type: ignore[attr-defined]
    assert json.loads(str(thief.input_hashes_json)) == {  # type: ignore[attr-defined]
        f"pending/{name}": digest for name, (digest, _) in before.items()
    }
    assert not (input_dir / "pending" / "face.png").is_symlink()
    assert {p.name: (sha256_file(p), os.stat(p).st_ino) for p in pending.iterdir()} == before
    (pending / "job.json").write_bytes(job_json)  # the upload finishes
    rows = _settle(intake)
    victim = rows["pending"]
    assert victim.state == "queued", (victim.state, victim.waiting_reason, victim.error_message)  # type: ignore[attr-defined]
    taken = Path(str(victim.job_dir)) / "input"  # type: ignore[attr-defined]
    assert {p.name: sha256_file(p) for p in taken.iterdir() if p.name != "job.json"} == {
        name: digest for name, (digest, _) in before.items()
    }
    assert not pending.exists()


def test_loose_path_rule_refuses_with_path_escape(tmp_path: Path) -> None:
    from functools import partial

    from daemon.inbox import loose_path_problem

    make_job_bundle(tmp_path, duration_s=1.0, image_size=(48, 40))
    doc = json.loads((tmp_path / "job.json").read_text())
    rule = partial(loose_path_problem, tmp_path)
    parse_job(json.dumps(doc).encode(), base_dir=tmp_path, loose_paths=rule)
    (tmp_path / ".hidden.png").write_bytes((tmp_path / "face.png").read_bytes())
    with pytest.raises(InvalidJob) as caught:
        parse_job(
            json.dumps({**doc, "cond_video": ".hidden.png"}).encode(), base_dir=tmp_path, loose_paths=rule
        )
    assert caught.value.code == "path_escape"


# ---------------------------------------------------------------- 6, 7: FIFOs and deep JSON never stop a scan


def _in_thread(fn: object, timeout_s: float = 10.0) -> object:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "blocked (a FIFO opened for reading?)"
    return result[0] if result else None


def test_a_fifo_named_json_neither_blocks_the_scan_nor_is_read(intake: Intake) -> None:
    fifo = intake.settings.inbox / "pipe.json"
    os.mkfifo(fifo)
    assert _in_thread(lambda: loose_media_names(fifo)) == set()
    with pytest.raises(OSError):
        read_regular(fifo, max_bytes=10)
    rows = _in_thread(lambda: _settle(intake))
    row = rows["pipe"]  # type: ignore[index]
    assert row.state == "rejected" and row.error_code == "not_a_file", row
    assert stat.S_ISFIFO(os.lstat(intake.settings.outbox / "failed" / "pipe" / "pipe.json").st_mode)


@pytest.mark.parametrize("form", ["loose", "bundle"])
def test_json_nested_100000_deep_is_a_bad_job(intake: Intake, form: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    if form == "loose":
        (intake.settings.inbox / "deep.json").write_text(deep)
        assert loose_media_names(intake.settings.inbox / "deep.json") == set()
    else:
        (intake.settings.inbox / "deep").mkdir()
        (intake.settings.inbox / "deep" / "job.json").write_text(deep)
    rows = _settle(intake)
    assert rows["deep"].state == "rejected" and rows["deep"].error_code == "bad_json"  # type: ignore[attr-defined]
    assert "levels deep" in str(rows["deep"].error_message)  # type: ignore[attr-defined]


def test_json_depth_check_skips_strings_and_is_linear() -> None:
    assert not json_too_deep(json.dumps({"prompt": "[" * 5000 + '\\"{' * 5000}))
    assert json_too_deep("[" * 33 + "]" * 33) and not json_too_deep("[" * 32 + "]" * 32)
    assert json_too_deep('{"a": ' * 40 + "1" + "}" * 40)


# ---------------------------------------------------------------- 8: FIFOs in bundles, another filesystem


def _other_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    folder = shm / f"it-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    return folder


def test_move_upload_across_filesystems_with_a_fifo_and_a_link(tmp_path: Path) -> None:
    other = _other_filesystem(tmp_path)
    try:
        src = other / "b"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "a.txt").write_text("a")
        os.mkfifo(src / "pipe")
        (src / "link").symlink_to("/etc/passwd")
        _in_thread(lambda: move_upload(src, tmp_path / "kept"))
        assert not src.exists()
        assert (tmp_path / "kept" / "sub" / "a.txt").read_text() == "a"
        assert (tmp_path / "kept" / "link").is_symlink()
        assert not os.path.lexists(tmp_path / "kept" / "pipe")  # a FIFO holds nothing to keep
    finally:
        remove_tree(other)


# ---------------------------------------------------------------- 10: NUL bytes, deep trees


def test_a_nul_byte_in_a_media_path_is_a_bad_value(intake: Intake) -> None:
    bundle = _bundle(intake, "nul")
    doc = json.loads((bundle / "job.json").read_text())
    doc["cond_video"] = "face\u0000.png"
    (bundle / "job.json").write_text(json.dumps(doc))
    rows = _settle(intake)
    assert rows["nul"].state == "rejected" and rows["nul"].error_code == "bad_value"  # type: ignore[attr-defined]


def test_a_bundle_1100_folders_deep_is_rejected_and_removable(intake: Intake) -> None:
    bundle = _bundle(intake, "deeptree")
    path = bundle
    for _ in range(1100):
        path = path / "d"
        os.mkdir(path)  # relative mkdir would need chdir; paths stay under PATH_MAX with 1-char names
    with pytest.raises(BadBundle):
        walk_bundle(bundle)
    rows = _settle(intake)
    assert rows["deeptree"].state == "rejected" and rows["deeptree"].error_code == "too_deep"  # type: ignore[attr-defined]
    kept = intake.settings.outbox / "failed" / "deeptree"
    assert (kept / "job.json").is_file()
    remove_tree(kept)  # no RecursionError, whatever the depth
    assert not kept.exists()


# ---------------------------------------------------------------- 14: sample rates and length


def _wav_with_rate(path: Path, rate: int) -> None:
    data = bytearray(path.read_bytes())
    channels = int.from_bytes(data[22:24], "little")
    bits = int.from_bytes(data[34:36], "little")
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * channels * bits // 8).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_a_wav_header_saying_1_hz_is_refused(intake: Intake) -> None:
    bundle = _bundle(intake, "onehz")
    make_wav(bundle / "voice.WAV", duration_s=0.05, rate=16000, channels=1, seed=1)  # 800 samples
    _wav_with_rate(bundle / "voice.WAV", 1)
    rows = _settle(intake)
    assert rows["onehz"].state == "rejected" and rows["onehz"].error_code == "bad_sample_rate"  # type: ignore[attr-defined]


def test_speech_longer_than_max_audio_s_is_refused_before_queueing(intake: Intake) -> None:
    _bundle(intake, "long", duration_s=4.0)  # max_audio_s = 3 in this fixture
    rows = _settle(intake)
    assert rows["long"].state == "rejected" and rows["long"].error_code == "audio_too_long"  # type: ignore[attr-defined]
    assert "max_audio_s" in str(rows["long"].error_message)  # type: ignore[attr-defined]


def test_media_whose_tags_are_not_utf8_are_queued(intake: Intake) -> None:
    """A speech WAV and a video MP4 whose title tags are Latin-1 pass the decode probe (PyAV < 19
    failed them at open; 19 removed the option the probe used, which failed every job)."""
    staged = intake.settings.inbox / ".tagged"
    make_job_bundle(staged, kind="video", duration_s=1.0, image_size=(48, 40))
    add_wav_tags(staged / "voice.WAV")
    make_mp4(staged / "talk.mp4", duration_s=1.0, title=LATIN1_TAG)
    os.rename(staged, intake.settings.inbox / "tagged")
    row = _settle(intake)["tagged"]
    assert row.state == "queued", (row.error_code, row.error_message)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- 17: streamed WAV headers


def _streamed(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"
    at = data.index(b"data")
    data[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))


def test_a_streamed_wav_without_checksums_waits_for_stream_settle_s(intake: Intake) -> None:
    bundle = _bundle(intake, "streamed")
    assert not wav_size_unknown(bundle / "voice.WAV")
    _streamed(bundle / "voice.WAV")
    assert wav_size_unknown(bundle / "voice.WAV")
    rows = _settle(intake)
    row = rows["streamed"]
    assert row.state == "waiting" and "no size in its WAV header" in str(row.waiting_reason), row  # type: ignore[attr-defined]
    intake.reconfigure(
        settings_from_mapping({"settle_s": 0.0, "stream_settle_s": 0.0}, base=intake.settings.inbox.parent)
    )
    intake.settings.inbox.mkdir(exist_ok=True)
    rows = _settle(intake)
    assert rows["streamed"].state == "queued"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- 19: checksum names


@pytest.mark.parametrize(
    "name", ["../face.png", "./../face.png", "/face.png", "sub/../face.png", "other.png"]
)
def test_a_checksum_name_that_is_not_a_file_of_the_job_is_a_bad_value(tmp_path: Path, name: str) -> None:
    make_job_bundle(tmp_path, duration_s=1.0, image_size=(48, 40))
    doc = json.loads((tmp_path / "job.json").read_text())
    doc["checksums"] = {name: sha256_file(tmp_path / "face.png")}
    with pytest.raises(InvalidJob) as caught:
        parse_job(json.dumps(doc).encode(), base_dir=tmp_path)
    assert caught.value.code == "bad_value" and caught.value.field == f"checksums.{name}"
    doc["checksums"] = {
        "./face.png": sha256_file(tmp_path / "face.png")
    }  # the same name, written another way
    assert parse_job(json.dumps(doc).encode(), base_dir=tmp_path).checksums[0][0] == "face.png"


def test_a_bad_checksum_name_is_rejected_even_while_a_medium_is_missing(intake: Intake) -> None:
    bundle = _bundle(intake, "cks")
    doc = json.loads((bundle / "job.json").read_text())
    (bundle / "voice.WAV").unlink()  # not uploaded yet: alone, this would wait
    doc["checksums"] = {"../face.png": sha256_file(bundle / "face.png")}
    (bundle / "job.json").write_text(json.dumps(doc))
    rows = _settle(intake)
    assert rows["cks"].state == "rejected" and rows["cks"].error_code == "bad_value"  # type: ignore[attr-defined]


def test_scan_of_an_inbox_holding_every_hostile_kind_at_once(intake: Intake) -> None:
    """All of the above side by side: one scan judges each, none stops the others."""
    inbox = intake.settings.inbox
    os.mkfifo(inbox / "fifo.json")
    (inbox / "deep.json").write_text("{" * 50_000)
    _bundle(intake, "good")
    entries = _in_thread(lambda: scan(inbox))
    assert sorted(e.name for e in entries) == ["deep", "fifo", "good"]  # type: ignore[attr-defined]
    rows = _settle(intake)
    assert {n: r.state for n, r in rows.items()} == {  # type: ignore[attr-defined]
        "deep": "rejected",
        "fifo": "rejected",
        "good": "queued",
    }
