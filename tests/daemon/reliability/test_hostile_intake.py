"""Hostile uploads, round 2 (issue 13, the intake holes), against a real daemon process with the
tiny model: each bad entry ends with its own error code, the good ones render, the daemon stays up
and starts again with the bad files present, and what is rendered is exactly what was claimed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.helpers.daemon import FINAL, Daemon
from tests.helpers.proc import wait_until


@pytest.fixture(scope="module")
def daemon(daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    d = daemon_factory(
        "intake2", incomplete_timeout_s=60.0, max_running=1, max_audio_s=4.0, stream_settle_s=8.0
    )
    d.start()
    return d


def _stage(d: Daemon, name: str, seed: int, edit: Callable[[Path, dict], None] | None = None) -> Path:
    """A valid bundle made under a dot-name, changed by `edit`, renamed into the inbox."""
    staged = d.inbox / f".stage-{seed}"
    harness.make_bundle(staged, seed=seed, checksums=False)
    doc = json.loads((staged / "job.json").read_text())
    if edit is not None:
        edit(staged, doc)
    if doc:
        (staged / "job.json").write_text(json.dumps(doc))
    os.rename(staged, d.inbox / name)
    harness.count("faults injected")
    return d.inbox / name


def _wav_rate(path: Path, rate: int) -> None:
    data = bytearray(path.read_bytes())
    channels, bits = int.from_bytes(data[22:24], "little"), int.from_bytes(data[34:36], "little")
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * channels * bits // 8).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _judged(d: Daemon, cases: dict[str, set[str]], timeout_s: float = 120) -> dict[str, dict]:
    def settled() -> bool:
        d.assert_alive()
        rows = {r["name"]: r for r in d.jobs()}
        return all(n in rows and rows[n]["state"] in FINAL for n in cases)

    try:
        wait_until(settled, timeout_s, "every hostile entry to be judged", 0.5)
    finally:
        rows = {r["name"]: r for r in d.jobs()}
        print(
            json.dumps({n: (rows.get(n, {}).get("state"), rows.get(n, {}).get("error_code")) for n in cases})
        )
    problems = []
    for name, codes in cases.items():
        row = rows[name]
        want = "done" if not codes else "rejected"
        if row["state"] != want or (codes and row["error_code"] not in codes):
            problems.append(f"{name}: {row['state']} {row['error_code']} {row['error_message']}")
    assert not problems, "\n".join(problems)
    return rows


def test_hostile_intake_entries_each_get_their_error(daemon: Daemon) -> None:
    d = daemon
    inbox = d.inbox
    started = time.monotonic()

    # 2: a loose JSON naming another client's bundle files, or files of a staged dot-folder
    _stage(d, "victim", 500)
    (inbox / "thief.json").write_text(
        json.dumps(
            {"prompt": "p", "cond_video": "victim/face.png", "cond_audio": {"person1": "victim/voice.WAV"}}
        )
    )
    staged = inbox / ".uploading-victim2"
    harness.make_bundle(staged, seed=501, checksums=False)
    (inbox / "thief2.json").write_text(
        json.dumps(
            {
                "prompt": "p",
                "cond_video": f"{staged.name}/face.png",
                "cond_audio": {"person1": f"{staged.name}/voice.WAV"},
            }
        )
    )
    # 6: a FIFO named *.json; 7: a loose JSON nested 100,000 deep
    os.mkfifo(inbox / "pipe.json")
    (inbox / "deep-loose.json").write_text("[" * 100_000 + "]" * 100_000)

    # 10: a NUL byte in a media path; a bundle 1,100 folders deep
    def nul(b: Path, doc: dict) -> None:
        doc["cond_audio"] = {"person1": "voice\u0000.WAV"}

    def deep_tree(b: Path, doc: dict) -> None:
        path = b
        for _ in range(1100):
            path = path / "d"
            path.mkdir()

    # 14: a WAV header saying 1 Hz; speech longer than max_audio_s (4 s here)
    def one_hz(b: Path, doc: dict) -> None:
        from tests.helpers.media import make_wav

        make_wav(b / "voice.WAV", duration_s=0.075, rate=16000, channels=1, seed=2)  # 1,200 samples
        _wav_rate(b / "voice.WAV", 1)

    def too_long(b: Path, doc: dict) -> None:
        from tests.helpers.media import make_wav

        make_wav(b / "voice.WAV", duration_s=5.0, rate=16000, channels=1, seed=3)

    # 19: a checksum named "../face.png"
    def dotdot_checksum(b: Path, doc: dict) -> None:
        doc["checksums"] = {"../face.png": harness.sha256(b / "face.png")}

    for seed, (name, edit) in enumerate(
        {
            "nul-path": nul,
            "deep-tree": deep_tree,
            "one-hz": one_hz,
            "too-long": too_long,
            "dotdot-checksum": dotdot_checksum,
        }.items(),
        start=510,
    ):
        _stage(d, name, seed, edit)
    harness.count("faults injected", 4)
    cases = {
        "victim": set(),
        "thief": {"path_escape"},
        "thief2": {"path_escape"},
        "pipe": {"not_a_file"},
        "deep-loose": {"bad_json"},
        "nul-path": {"bad_value"},
        "deep-tree": {"too_deep"},
        "one-hz": {"bad_sample_rate"},
        "too-long": {"audio_too_long"},
        "dotdot-checksum": {"bad_value"},
    }
    rows = _judged(d, cases)
    # kept as it came, 1,100 folders deep: removed here (pytest's own clean-up recurses)
    subprocess.run(["rm", "-rf", str(d.outbox / "failed" / "deep-tree")], check=True)
    # the staged upload the second thief named was untouched and renders once renamed into place
    os.rename(staged, inbox / "victim2")
    d.wait_state("victim2", ["done"], timeout_s=120)
    victim = rows["victim"]
    assert set(json.loads(victim["input_hashes_json"])) == {"face.png", "voice.WAV"}
    # judged at once: none of them waited for incomplete_timeout_s (60 s)
    assert time.monotonic() - started < 60
    harness.count("hostile intake cases judged", len(cases))

    # a FIFO and a deep JSON already in the inbox when the daemon starts: it starts and judges them
    assert d.stop(timeout_s=60) == 0
    os.mkfifo(inbox / "pipe-at-start.json")
    (inbox / "deep-at-start.json").write_text("{" * 100_000)
    d.start(timeout_s=90)
    _judged(d, {"pipe-at-start": {"not_a_file"}, "deep-at-start": {"bad_json"}})
    d.assert_alive()
    harness.check_invariants(d, idle=False)
    harness.tally(d)


def test_a_medium_replaced_by_a_symlink_after_the_claim_is_not_rendered(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A process whose working directory is inside the bundle keeps replacing voice.WAV with a
    symlink to another file once the bundle has left the inbox: the render must use the bytes
    that were claimed and hashed, never the other file."""
    d = daemon
    other = tmp_path / "other"
    harness.make_bundle(other, seed=520, checksums=False)
    staged = d.inbox / ".stage-swap"
    harness.make_bundle(staged, seed=521, checksums=False)
    original = harness.sha256(staged / "voice.WAV")
    script = (
        f'while [ -e "{d.inbox}/swap" ] || [ -e "{staged}" ]; do sleep 0.02; done; '
        f'for i in $(seq 300); do ln -sfn "{other}/voice.WAV" voice.WAV 2>/dev/null; sleep 0.02; done'
    )
    swapper = subprocess.Popen(["bash", "-c", script], cwd=staged)
    try:
        os.rename(staged, d.inbox / "swap")
        harness.count("faults injected")
        row = d.wait_state("swap", ["done"], timeout_s=120)
    finally:
        swapper.kill()
        swapper.wait(10)
    claimed = Path(row["job_dir"]) / "input" / "voice.WAV"
    assert not claimed.is_symlink() and harness.sha256(claimed) == original
    assert json.loads(row["input_hashes_json"])["voice.WAV"] == original
    sidecar = json.loads(Path(row["output_json"]).read_text())
    assert original in json.dumps(sidecar)
    harness.check_invariants(d, idle=False)


def test_a_streamed_wav_written_in_place_with_a_stall_is_not_judged_complete(daemon: Daemon) -> None:
    """A WAV with 0xFFFFFFFF sizes (streamed) written in place, no checksums, stalls for longer
    than settle_s: it stays waiting (stream_settle_s = 8 s here) and renders whole once written."""
    from tests.helpers.media import make_wav

    d = daemon
    src = d.root / "src-streamed"
    harness.make_bundle(src, seed=530, checksums=False)
    make_wav(src / "voice.WAV", duration_s=3.0, rate=16000, channels=1, seed=5)
    data = bytearray((src / "voice.WAV").read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"
    at = data.index(b"data")
    data[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    half = at + 8 + (len(data) - at - 8) // 2 // 2 * 2
    bundle = d.inbox / "streamed"
    bundle.mkdir()
    for name in ("face.png", "job.json"):
        (bundle / name).write_bytes((src / name).read_bytes())
    with open(bundle / "voice.WAV", "wb") as f:
        f.write(data[:half])
        f.flush()
        harness.count("faults injected")
        time.sleep(5.0)  # the stall: longer than settle_s (1 s) and a probe
        row = d.jobs("streamed")[-1]
        assert row["state"] == "waiting", row
        assert "no size in its WAV header" in (row["waiting_reason"] or ""), row
        f.write(data[half:])
    done = d.wait_state("streamed", ["done"], timeout_s=120)
    # all 3 s of speech were taken, not the first half
    claimed = Path(done["job_dir"]) / "input" / "voice.WAV"
    assert claimed.read_bytes() == bytes(data)
    harness.check_invariants(d, idle=False)


def _other_filesystem(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the state dir")
    return shm


def test_fifos_in_bundles_on_another_filesystem_never_crash_nor_loop(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shm = _other_filesystem(tmp_path)
    inbox = shm / f"intake2-inbox-{os.getpid()}"
    inbox.mkdir()
    try:
        d: Daemon = daemon_factory("crossfs", inbox=str(inbox), incomplete_timeout_s=60.0, max_running=1)
        d.inbox = inbox

        def bundle(name: str, seed: int, edit: Callable[[Path], None]) -> None:
            staged = inbox / f".stage-{seed}"
            harness.make_bundle(staged, seed=seed, checksums=False)
            edit(staged)
            os.rename(staged, inbox / name)
            harness.count("faults injected")

        bundle("fifo-extra", 540, lambda b: os.mkfifo(b / "notes"))  # valid, with a FIFO beside
        d.start()

        def fifo_media(b: Path) -> None:
            (b / "voice.WAV").unlink()
            os.mkfifo(b / "voice.WAV")

        def deep(b: Path) -> None:
            path = b
            for _ in range(1100):
                path = path / "d"
                path.mkdir()

        bundle("fifo-media", 541, fifo_media)
        bundle("deep-tree", 542, deep)
        bundle("fifo-extra-later", 543, lambda b: os.mkfifo(b / "notes"))
        _judged(
            d,
            {
                "fifo-extra": set(),
                "fifo-extra-later": set(),
                "fifo-media": {"not_a_file"},
                "deep-tree": {"too_deep"},
            },
        )
        assert list(inbox.iterdir()) == []
        # each taken once: no copy retried again and again
        log = d.log.read_text(errors="replace")
        assert log.count("cannot take") == 0, log[-3000:]
        assert len(d.jobs("fifo-extra")) == 1 and len(d.jobs("fifo-extra-later")) == 1
        # and a start with such a bundle already there
        assert d.stop(timeout_s=60) == 0
        bundle("fifo-at-start", 544, fifo_media)
        d.start(timeout_s=90)
        _judged(d, {"fifo-at-start": {"not_a_file"}})
        d.assert_alive()
        harness.check_invariants(d, idle=False)
        harness.tally(d)
    finally:
        subprocess.run(["rm", "-rf", str(inbox)], check=False)  # whatever depth is left
