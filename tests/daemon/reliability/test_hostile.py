"""Hostile and broken input dropped into a running daemon's inbox.

Every entry must end with its own error (rejected, an error JSON in the outbox naming the
problem, the originals kept) or be admitted in arrival order, nothing outside the inbox may be
touched, and the daemon must stay up throughout. Also: 1,000 jobs dropped at once, and an
inotify queue overflow.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.inbox import output_name
from tests.daemon.reliability import harness
from tests.helpers.daemon import FINAL, Daemon
from tests.helpers.proc import wait_until

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture(scope="module")
def daemon(daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    # incomplete entries (a FIFO, an empty file, a missing job.json) are rejected after 6 s
    d = daemon_factory("hostile", incomplete_timeout_s=6.0, max_running=1)
    d.start()
    return d


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files outside the inbox that hostile jobs point at: they must stay untouched."""
    folder = tmp_path_factory.mktemp("outside")
    harness.make_bundle(folder / "victim", seed=7, checksums=False)
    return folder


def bundle(
    d: Daemon,
    name: str | bytes,
    seed: int,
    *,
    edit: Callable[[Path, dict], None] | None = None,
    checksums: bool = False,
) -> None:
    """Make a valid bundle under a dot-name, let `edit` break it, then rename it into the inbox."""
    staged = d.inbox / f".staging-{seed}"
    harness.make_bundle(staged, seed=seed, checksums=checksums)
    doc = json.loads((staged / "job.json").read_text())
    if edit is not None:
        edit(staged, doc)
    if doc and (staged / "job.json").is_file() and not (staged / "job.json").is_symlink():
        (staged / "job.json").write_text(json.dumps(doc))
    target = os.fsencode(d.inbox) + b"/" + (name if isinstance(name, bytes) else os.fsencode(name))
    os.rename(os.fsencode(staged), target)
    harness.count("faults injected")


def test_hostile_entries_each_get_their_error(daemon: Daemon, outside: Path) -> None:
    d = daemon
    victim = outside / "victim"
    before = {p.name: harness.sha256(p) for p in victim.iterdir()}

    def traversal(b: Path, doc: dict) -> None:
        doc["cond_audio"] = {"person1": f"../../{victim.relative_to(victim.anchor)}/voice.WAV"}

    def absolute(b: Path, doc: dict) -> None:
        doc["cond_video"] = str(victim / "face.png")

    def symlink_media(b: Path, doc: dict) -> None:
        (b / "voice.WAV").unlink()
        (b / "voice.WAV").symlink_to(victim / "voice.WAV")

    def hardlink_media(b: Path, doc: dict) -> None:
        (b / "voice.WAV").unlink()
        os.link(victim / "voice.WAV", b / "voice.WAV")

    def fifo_media(b: Path, doc: dict) -> None:
        (b / "voice.WAV").unlink()
        os.mkfifo(b / "voice.WAV")

    def fifo_json(b: Path, doc: dict) -> None:
        (b / "job.json").unlink()
        os.mkfifo(b / "job.json")
        doc.clear()

    def huge_sparse(b: Path, doc: dict) -> None:
        with open(b / "voice.WAV", "r+b") as f:
            f.truncate(3 * 1024**3)  # 3 GiB, sparse: over max_file_mb (2048), must not be read

    def truncated_png(b: Path, doc: dict) -> None:
        data = (b / "face.png").read_bytes()
        (b / "face.png").write_bytes(data[: len(data) // 2])

    def truncated_mp4(b: Path, doc: dict) -> None:
        from tests.helpers.media import make_mp4

        make_mp4(b / "talk.mp4", duration_s=2.0, seed=3)
        data = (b / "talk.mp4").read_bytes()
        (b / "talk.mp4").write_bytes(data[: len(data) * 2 // 3])
        doc["cond_video"] = "talk.mp4"

    def empty_wav(b: Path, doc: dict) -> None:
        (b / "voice.WAV").write_bytes(b"")

    def garbage_wav(b: Path, doc: dict) -> None:
        (b / "voice.WAV").write_bytes(os.urandom(300_000))

    def deep_json(b: Path, doc: dict) -> None:
        (b / "job.json").write_text("[" * 100_000 + "]" * 100_000)
        doc.clear()

    def bad_utf8_json(b: Path, doc: dict) -> None:
        (b / "job.json").write_bytes(b'{"prompt": "caf\xe9", "cond_video": "face.png"}')
        doc.clear()

    def big_json(b: Path, doc: dict) -> None:
        doc["prompt"] = "x" * 400_000  # over max_json_kb (256)

    def nan_json(b: Path, doc: dict) -> None:
        doc["seed"] = float("nan")

    def unknown_key(b: Path, doc: dict) -> None:
        doc["sample_stpes"] = 4

    def non_utf8_media(b: Path, doc: dict) -> None:
        os.rename(b / "face.png", os.fsencode(b) + b"/face-\xff.png")
        doc["cond_video"] = "face-\udcff.png"  # what Python makes of the byte; json.dumps escapes it

    cases: dict[str | bytes, tuple[Callable[[Path, dict], None] | None, set[str]]] = {
        "traversal": (traversal, {"path_escape"}),
        "absolute": (absolute, {"path_escape"}),
        "symlink-media": (symlink_media, {"symlink"}),
        # a hard link is a second name of the same file: taken, as a copy of its own
        "hardlink-media": (hardlink_media, set()),
        "fifo-media": (fifo_media, {"not_a_file"}),
        "fifo-json": (fifo_json, {"not_a_file"}),
        "huge-sparse": (huge_sparse, {"too_large"}),
        "truncated-png": (truncated_png, {"bad_media"}),
        "truncated-mp4": (truncated_mp4, {"bad_media"}),
        "empty-wav": (empty_wav, {"incomplete", "empty_file"}),
        "garbage-wav": (garbage_wav, {"bad_media"}),
        "deep-json": (deep_json, {"bad_json"}),
        "bad-utf8-json": (bad_utf8_json, {"bad_json"}),
        "big-json": (big_json, {"too_large"}),
        "nan-json": (nan_json, {"bad_json", "bad_value", "bad_type"}),
        "unknown-key": (unknown_key, {"unknown_key"}),
        b"non-utf8-\xe9t\xe9": (None, set()),  # a valid job under a Latin-1 name: rendered
        "non-utf8-media": (non_utf8_media, {"bad_json"}),  # no JSON text can name that file
        "n" * 240: (None, set()),  # a valid job with a very long name: rendered
        "N" * 255: (None, set()),  # NAME_MAX: "<name>.mp4" cannot exist: published under 200 bytes
    }
    for seed, (name, (edit, _)) in enumerate(cases.items(), start=300):
        bundle(d, name, seed, edit=edit)
    # a symlinked bundle and a symlinked loose job pointing out of the inbox
    os.symlink(victim, d.inbox / "symlink-bundle")
    os.symlink(
        victim / "job.json" if (victim / "job.json").exists() else victim, d.inbox / "symlink-loose.json"
    )
    cases["symlink-bundle"] = (None, {"symlink"})
    cases["symlink-loose"] = (None, {"symlink"})
    harness.count("faults injected", 2)

    def shown(name: str | bytes) -> str:
        return output_name(os.fsdecode(name) if isinstance(name, bytes) else name)

    def settled() -> bool:
        d.assert_alive()
        names = {r["name"]: r for r in d.jobs()}
        return all(shown(n) in names and names[shown(n)]["state"] in FINAL for n in cases)

    try:
        wait_until(settled, 120, "every hostile entry to be judged", 0.5)
    finally:
        rows = {r["name"]: r for r in d.jobs()}
        report = {
            shown(n): (
                rows.get(shown(n), {}).get("state"),
                rows.get(shown(n), {}).get("error_code"),
                (rows.get(shown(n), {}).get("error_message") or "")[:90],
            )
            for n in cases
        }
        print(json.dumps(report, indent=1))
    problems = []
    for name, (_, codes) in cases.items():
        row = rows[shown(name)]
        if codes == {"*"}:
            if row["state"] not in ("rejected", "failed") or not row["error_message"]:
                problems.append(
                    f"{shown(name)[:40]}: {row['state']} {row['error_code']} {row['error_message']}"
                )
        elif codes:
            if row["state"] != "rejected" or row["error_code"] not in codes:
                problems.append(
                    f"{shown(name)[:40]}: {row['state']} {row['error_code']} {row['error_message']}"
                )
                continue
            error = json.loads(Path(row["output_json"]).read_text())
            assert error["code"] == row["error_code"] and error["message"], error
        elif row["state"] != "done":
            problems.append(
                f"{shown(name)[:40]}: expected done, got {row['state']} {row['error_code']} "
                f"{row['error_message']}"
            )
    assert not problems, "\n".join(problems)
    # nothing outside the inbox was moved or changed, and the hard link was broken at the claim:
    # the outside name no longer shares its file with the job's input
    assert {p.name: harness.sha256(p) for p in victim.iterdir()} == before
    assert (victim / "voice.WAV").stat().st_nlink == 1
    d.assert_alive()
    harness.check_invariants(d, idle=False)
    harness.tally(d)


def test_inotify_overflow_then_a_job_is_still_taken(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Events lost to an overflowing inotify queue: the daemon notices and rescans."""
    d: Daemon = daemon_factory("overflow", rescan_s=120.0)
    lowered = False
    old = MAX_QUEUED_EVENTS.read_text().strip() if MAX_QUEUED_EVENTS.exists() else ""
    try:
        # the limit is read when an inotify instance is created: lower it only while the daemon
        # creates its watcher, then put it back (other programs on the machine are unaffected)
        try:
            MAX_QUEUED_EVENTS.write_text("64\n")
            lowered = True
        except OSError:
            pass
        d.start(wait_ready=False)
        wait_until(
            lambda: "render worker started" in d.log.read_text(errors="replace"),
            60,
            "the daemon to start its watcher",
        )
    finally:
        if lowered:
            MAX_QUEUED_EVENTS.write_text(old + "\n")
    d.wait_ready()
    flood = d.inbox / ".flood"
    flood.mkdir()
    n = 3000 if lowered else 60000
    for i in range(n):
        (flood / f"f{i}").touch()
    bundle(d, "after-flood", 900)
    harness.count("faults injected")
    # found long before the 120 s periodic rescan: only the overflow rescan (or events) can do that
    d.wait_state("after-flood", ["queued", "running", "done"], timeout_s=30)
    log = d.log.read_text(errors="replace")
    if lowered:
        assert "overflow" in log.lower(), log[-3000:]
    d.wait_state("after-flood", ["done"], timeout_s=90)
    shutil.rmtree(flood)
    d.assert_alive()
    harness.check_invariants(d)
    harness.tally(d)


@pytest.mark.timeout(300)
def test_a_thousand_jobs_dropped_at_once(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """1,000 bundles appear in one go: each is seen, admitted in arrival order up to the cap, the
    rest wait ("queue full"); the daemon stays up and responsive."""
    from tests.helpers.media import make_image, make_wav

    d: Daemon = daemon_factory("thousand", max_queued=20, max_running=1)
    media = tmp_path / "media"
    media.mkdir()
    make_image(media / "face.png", width=48, height=40, seed=1)
    make_wav(media / "voice.wav", duration_s=harness.MIN_AUDIO_S, rate=16000, channels=1, seed=1)
    staging = d.inbox / ".thousand"
    staging.mkdir()
    for i in range(1000):
        b = staging / f"job{i:04d}"
        b.mkdir()
        shutil.copyfile(media / "face.png", b / "face.png")
        shutil.copyfile(media / "voice.wav", b / "voice.wav")
        # a distinct seed per job: same media, different settings, so none is a duplicate
        (b / "job.json").write_text(
            json.dumps(
                {
                    "prompt": "p",
                    "cond_video": "face.png",
                    "seed": i,
                    "cond_audio": {"person1": "voice.wav"},
                    "max_frame_num": 33,
                }
            )
        )
    d.start()
    for b in sorted(staging.iterdir()):
        os.rename(b, d.inbox / b.name)
    harness.count("jobs dropped at once", 1000)

    def all_seen() -> bool:
        d.assert_alive()
        return len(d.jobs()) >= 1000

    wait_until(all_seen, 120, "1,000 ledger rows", 1.0)
    wait_until(
        lambda: len([r for r in d.jobs() if r["state"] in ("queued", "running", "done")]) >= 20,
        120,
        "the queue to fill",
        1.0,
    )
    rows = d.jobs()
    admitted = [r for r in rows if r["state"] in ("queued", "running", "done")]
    waiting = [r for r in rows if r["state"] == "waiting"]
    assert len(admitted) + len(waiting) == 1000, {r["state"] for r in rows}
    assert len([r for r in rows if r["state"] == "queued"]) <= 20
    # admitted strictly in arrival order: no waiting job arrived before an admitted one
    last_admitted = max(r["seq"] for r in admitted)
    assert all(r["seq"] > last_admitted for r in waiting)
    assert [r["name"] for r in admitted] == [f"job{i:04d}" for i in range(len(admitted))]
    time.sleep(2)
    d.assert_alive()
    assert d.stop(timeout_s=60) == 0
