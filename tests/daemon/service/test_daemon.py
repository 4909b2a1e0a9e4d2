"""The daemon as a real process on a real tree (inbox, outbox, SQLite ledger), with the fake
pipeline of `fake_pipeline.py` in its worker process so each test takes seconds. The real tiny
model runs end to end in `test_daemon_tiny.py`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle, make_loose_job
from tests.helpers.proc import infinitetalk

pytestmark = pytest.mark.timeout(180)


def _bundle(d: Daemon, name: str, **settings: object) -> Path:
    """Write a bundle under a dot-name, then rename it into the inbox (as `submit` does)."""
    staging = d.inbox / f".{name}.tmp"
    make_job_bundle(
        staging,
        duration_s=settings.pop("duration_s", 1.0),
        seed=settings.pop("seed", 0),  # type: ignore[arg-type]
        **settings,
    )
    os.rename(staging, d.inbox / name)
    return d.inbox / name


def test_bundle_and_loose_job_are_published(daemon: Daemon) -> None:
    _bundle(daemon, "alice")
    make_loose_job(daemon.inbox, "bob", duration_s=1.0, seed=1)
    daemon.start()
    for name in ("alice", "bob"):
        job = daemon.wait_state(name, "done")
        assert Path(job["output_video"]) == daemon.outbox / f"{name}.mp4"
        sidecar = json.loads((daemon.outbox / f"{name}.json").read_text())
        assert sidecar["job_id"] == job["id"] and sidecar["state"] == "done"
        assert sidecar["settings"]["seed"] == json.loads(job["spec_json"])["seed"]
        assert set(sidecar["input_hashes"].values()) == set(json.loads(job["input_hashes_json"]).values())
        assert (daemon.outbox / f"{name}.jpg").stat().st_size > 0
        kinds = [e["kind"] for e in daemon.events(job["id"])]
        states = [k for i, k in enumerate(kinds) if k != "progress" and (i == 0 or k != kinds[i - 1])]
        assert states == ["created", "waiting", "queued", "started", "done"], kinds
        assert "progress" in kinds
    # inputs were claimed out of the inbox; nothing of the loose job is left behind
    assert sorted(p.name for p in daemon.inbox.iterdir()) == []
    assert not list((daemon.outbox / ".partial").iterdir())


def test_a_silent_speaker_job_is_taken_and_published(daemon: Daemon) -> None:
    """`"person2": "None"` (the reference's silent speaker) names no file: a bundle and a loose job
    with it are claimed, hashed and published; no file called None is looked for or moved."""
    for name, loose in (("duo", False), ("solo", True)):
        if loose:
            make_loose_job(daemon.inbox, name, kind="two_add", duration_s=1.0, seed=2)
            job_file = daemon.inbox / f"{name}.json"
        else:
            staging = daemon.inbox / f".{name}.tmp"
            make_job_bundle(staging, kind="two_add", duration_s=1.0, seed=3)
            job_file = staging / "job.json"
        doc = json.loads(job_file.read_text())
        (job_file.parent / doc["cond_audio"]["person2"]).unlink()
        doc["cond_audio"]["person2"] = "None"
        job_file.write_text(json.dumps(doc))
        if not loose:
            os.rename(staging, daemon.inbox / name)
    daemon.start()
    for name in ("duo", "solo"):
        job = daemon.wait_state(name, "done")
        spec = json.loads(job["spec_json"])
        assert spec["cond_audio"]["person2"] == "None"
        assert len(json.loads(job["input_hashes_json"])) == 2  # the image and person 1's speech
    assert sorted(p.name for p in daemon.inbox.iterdir()) == []


def test_a_videos_sound_as_the_speech(daemon: Daemon) -> None:
    """cond_audio may name a video: with sound it is taken (even the cond_video itself); without
    an audio stream the job is rejected as bad_media naming cond_audio.person1."""
    from tests.helpers.media import make_mp4

    for name, with_sound in (("own", True), ("mute", False)):
        staging = daemon.inbox / f".{name}.tmp"
        make_job_bundle(staging, kind="video", duration_s=1.6, seed=4)
        doc = json.loads((staging / "job.json").read_text())
        if with_sound:
            doc["cond_audio"] = {"person1": doc["cond_video"]}
        else:
            make_mp4(staging / "silent.mp4", duration_s=1.6, audio=False, seed=5)
            doc["cond_audio"] = {"person1": "silent.mp4"}
        (staging / "job.json").write_text(json.dumps(doc))
        os.rename(staging, daemon.inbox / name)
    daemon.start()
    daemon.wait_state("own", "done")
    mute = daemon.wait_state("mute", "rejected")
    assert mute["error_code"] == "bad_media" and mute["error_field"] == "cond_audio.person1", mute


def test_caps_hold_with_thirty_jobs(tmp_path: Path) -> None:
    # renders slow enough that claiming (a copy of each job's files, fsynced) outpaces them
    d = Daemon(tmp_path, env={"FAKE_PIPELINE_STEP_S": "0.04"})
    staging = tmp_path / "staging"
    make_job_bundle(staging / "proto", duration_s=1.0, seed=0)
    for i in range(30):  # distinct prompts: no duplicates
        doc = json.loads((staging / "proto" / "job.json").read_text())
        doc["prompt"] = f"job {i}"
        doc["priority"] = i % 3
        target = staging / f"job{i:02d}"
        target.mkdir()
        for f in (staging / "proto").iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        (target / "job.json").write_text(json.dumps(doc))
    for i in range(30):
        os.rename(staging / f"job{i:02d}", d.inbox / f"job{i:02d}")
    d.start()
    peak = {"queued": 0, "running": 0, "waiting": 0}

    def check() -> None:
        counts = d.counts()
        for state in peak:
            peak[state] = max(peak[state], counts.get(state, 0))
        assert counts.get("queued", 0) <= 20, counts
        assert counts.get("running", 0) <= 3, counts

    try:
        d.wait_for(lambda: d.counts().get("done", 0) == 30, 150, "30 jobs done", every=check)
    finally:
        d.stop()
    assert peak["queued"] <= 20 and peak["running"] <= 3, peak
    # Replay the ledger's history: every state change wrote its event in the same transaction,
    # so the counts after each event are exactly the counts the ledger went through.
    state_of_event = {
        "waiting": "waiting",
        "queued": "queued",
        "started": "running",
        "retry": "retry_wait",
        "done": "done",
        "failed": "failed",
        "rejected": "rejected",
        "cancelled": "cancelled",
    }
    states: dict[str, str] = {}
    history_peak = {"queued": 0, "running": 0, "waiting": 0}
    for event in d.events():
        if event["kind"] in state_of_event:
            states[event["job_id"]] = state_of_event[event["kind"]]
            for state in history_peak:
                history_peak[state] = max(history_peak[state], sum(1 for v in states.values() if v == state))
    assert history_peak["queued"] == 20 and history_peak["running"] == 3, history_peak
    assert history_peak["waiting"] >= 7, history_peak
    waits = [
        j
        for j in d.jobs()
        if any(e["kind"] == "waiting" and "queue full" in e["data_json"] for e in d.events(j["id"]))
    ]
    assert waits, "some jobs must have waited for room in the queue"
    assert len(list(d.outbox.glob("job*.mp4"))) == 30


def test_bad_inputs_are_rejected_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    inbox = daemon.inbox
    cases: dict[str, tuple[str, str]] = {}  # name -> (code, field)

    def bundle(name: str, code: str, field: str, **kw: object) -> Path:
        cases[name] = (code, field)
        staging = inbox / f".{name}"
        make_job_bundle(staging, **{"duration_s": 1.0, **kw})  # type: ignore[arg-type]
        return staging

    def publish(staging: Path) -> None:
        os.rename(staging, inbox / staging.name[1:])

    s = bundle("badjson", "bad_json", "")
    (s / "job.json").write_text('{"prompt": "x", ')
    publish(s)
    s = bundle("unknownkey", "unknown_key", "colour", colour="red")
    publish(s)
    s = bundle("escape", "path_escape", "cond_video")
    doc = json.loads((s / "job.json").read_text())
    doc["cond_video"] = "../../etc/passwd.png"
    (s / "job.json").write_text(json.dumps(doc))
    publish(s)
    s = bundle("absolute", "path_escape", "cond_video")
    doc["cond_video"] = "/etc/hostname.png"
    (s / "job.json").write_text(json.dumps(doc))
    publish(s)
    s = bundle("symlink", "symlink", "cond_video")
    (s / "face.png").unlink()
    (s / "face.png").symlink_to("/etc/hostname")
    publish(s)
    s = bundle("fifo", "not_a_file", "cond_audio.person1")
    (s / "voice.WAV").unlink()
    os.mkfifo(s / "voice.WAV")
    publish(s)
    s = bundle("undecodable", "bad_media", "cond_audio.person1")
    (s / "voice.WAV").write_bytes(b"RIFF" + os.urandom(3000))
    publish(s)
    s = bundle("truncated", "bad_media", "cond_video")
    data = (s / "face.png").read_bytes()
    (s / "face.png").write_bytes(data[: len(data) // 2])
    publish(s)
    s = bundle("short", "audio_too_short", "cond_audio.person1", duration_s=0.2)
    publish(s)
    s = bundle("ext", "bad_extension", "cond_video")
    (s / "face.png").rename(s / "face.gif")
    doc = json.loads((s / "job.json").read_text())
    doc["cond_video"] = "face.gif"
    (s / "job.json").write_text(json.dumps(doc))
    publish(s)
    (inbox / "notjson.json").write_text("[1, 2]")
    cases["notjson"] = ("bad_json", "")
    (inbox / "huge.json").write_text(" " * (300 * 1024) + "{}")
    cases["huge"] = ("too_large", "huge.json")
    daemon.start()
    for name, (code, field) in cases.items():
        job = daemon.wait_state(name, ("rejected", "done", "failed"), timeout_s=60)
        assert job["state"] == "rejected", (name, job)
        assert job["error_code"] == code, (name, job["error_code"], job["error_message"])
        assert (job["error_field"] or "") == field, (name, job["error_field"])
        error = json.loads((daemon.outbox / f"{name}.error.json").read_text())
        assert error["code"] == code and error["job_id"] == job["id"] and error["message"]
        kept = Path(error["originals"])
        assert kept.parent == daemon.outbox / "failed" and any(kept.iterdir()), name
    # nothing from the bad jobs stays in the inbox, and a good job still renders
    assert [p.name for p in inbox.iterdir()] == []
    _bundle(daemon, "good")
    daemon.wait_state("good", "done")


def test_incomplete_upload_waits_then_completes(daemon: Daemon) -> None:
    daemon.start()
    staging = daemon.root / "src"
    make_job_bundle(staging, duration_s=1.0)
    bundle = daemon.inbox / "late"
    bundle.mkdir()
    # rsync order: the job file lands before the media
    (bundle / "job.json").write_bytes((staging / "job.json").read_bytes())
    job = daemon.wait_for(
        lambda: (
            (j := daemon.job("late")) and j["waiting_reason"] and "waiting for" in j["waiting_reason"] and j
        ),
        30,
        "incomplete upload noticed",
    )
    assert job["state"] == "waiting"
    (bundle / "face.png").write_bytes((staging / "face.png").read_bytes())
    (bundle / "voice.WAV").write_bytes((staging / "voice.WAV").read_bytes())
    daemon.wait_state("late", "done")


def test_checksums_gate_completeness_and_timeout_rejects(tmp_path: Path) -> None:
    d = Daemon(tmp_path, config={"incomplete_timeout_s": 3})
    try:
        d.start()
        staging = tmp_path / "src"
        make_job_bundle(staging, duration_s=1.0)
        voice = (staging / "voice.WAV").read_bytes()
        doc = json.loads((staging / "job.json").read_text())
        doc["checksums"] = {
            "face.png": hashlib.sha256((staging / "face.png").read_bytes()).hexdigest(),
            "voice.WAV": hashlib.sha256(voice).hexdigest(),
        }
        (staging / "job.json").write_text(json.dumps(doc))
        bundle = d.inbox / "hashed"
        bundle.mkdir()
        for name in ("job.json", "face.png"):
            (bundle / name).write_bytes((staging / name).read_bytes())
        (bundle / "voice.WAV").write_bytes(voice[: len(voice) // 2])  # an interrupted upload
        d.wait_for(
            lambda: (j := d.job("hashed")) and "checksum mismatch" in (j["waiting_reason"] or ""),
            20,
            "checksum mismatch noticed",
        )
        (bundle / "voice.WAV").write_bytes(voice)
        d.wait_state("hashed", "done")
        # an upload that never completes is rejected after incomplete_timeout_s
        stuck = d.inbox / "stuck"
        stuck.mkdir()
        (stuck / "job.json").write_bytes((staging / "job.json").read_bytes())
        job = d.wait_state("stuck", "rejected", timeout_s=30)
        assert job["error_code"] == "incomplete" and "still incomplete" in job["error_message"]
        assert (d.outbox / "stuck.error.json").exists()
    finally:
        d.stop()


def test_temporary_names_are_never_taken(daemon: Daemon) -> None:
    for name in (".x.json", "x.json.part", "y.json.filepart", "z.ab12cd34.partial", ".~tmp~", "w.json.tmp"):
        path = daemon.inbox / name
        if name.startswith(".~"):
            path.mkdir()
        else:
            path.write_text('{"prompt": "x"}')
    _bundle(daemon, "real")
    daemon.start()
    daemon.wait_state("real", "done")
    assert [j["name"] for j in daemon.jobs()] == ["real"]
    assert len(list(daemon.inbox.iterdir())) == 6


def test_duplicate_points_at_the_original(daemon: Daemon) -> None:
    _bundle(daemon, "first")
    daemon.start()
    first = daemon.wait_state("first", "done")
    # same media and settings (seed drawn both times: ignored for duplicates)
    _bundle(daemon, "second")
    job = daemon.wait_state("second", "rejected")
    assert job["error_code"] == "duplicate" and job["duplicate_of"] == first["id"]
    error = json.loads((daemon.outbox / "second.error.json").read_text())
    assert error["duplicate_of"] == first["id"]


def test_kill9_mid_render_resumes_from_the_last_chunk(tmp_path: Path) -> None:
    d = Daemon(tmp_path, env={"FAKE_PIPELINE_STEP_S": "0.25"})
    _bundle(d, "long")
    d.start()
    d.wait_for(
        lambda: (j := d.job("long")) and j["state"] == "running" and (j["chunk"] or 0) >= 2,
        60,
        "chunk 2 running",
    )
    d.kill9()
    job = d.job("long")
    assert job["state"] == "running"  # what the dead daemon left behind
    time.sleep(0.5)
    d.start()
    done = d.wait_state("long", "done", timeout_s=60)
    d.stop()
    log = Path(done["job_dir"]) / "checkpoint" / "log.txt"
    assert not log.exists()  # checkpoints are removed once the job is published
    sidecar = json.loads((d.outbox / "long.json").read_text())
    assert sidecar["resumed_from_chunk"] >= 1
    assert done["attempts"] == 1  # a kill of the daemon is not the job's fault: not counted
    kinds = [e["kind"] for e in d.events(done["id"])]
    assert kinds.count("done") == 1 and kinds.count("started") == 2
    assert len(list(d.outbox.glob("long*.mp4"))) == 1


def test_sigterm_stops_at_a_step_boundary_and_requeues(tmp_path: Path) -> None:
    d = Daemon(tmp_path, env={"FAKE_PIPELINE_STEP_S": "0.3"})
    _bundle(d, "slow")
    d.start()
    d.wait_for(lambda: (j := d.job("slow")) and j["state"] == "running" and j["step"], 60, "running")
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0
    assert time.monotonic() - started < 10
    job = d.job("slow")
    assert job["state"] == "queued" and job["attempts"] == 0  # the interrupted attempt is not counted
    d.start()
    d.wait_state("slow", "done")
    d.stop()


def test_second_daemon_refuses_and_bad_config_exits_78(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    daemon.wait_for(lambda: (daemon.state / "ledger.sqlite3").exists(), 30, "ledger")
    second = daemon.cli("daemon", "--pipeline-factory", "tests.daemon.service.fake_pipeline:make")
    assert second.returncode == 75 and "another infinitetalk daemon" in second.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("max_queud = 3\n")
    out = infinitetalk("daemon", "--config", str(bad), env=daemon.environment())
    assert out.returncode == 78 and "max_queud: unknown key" in out.stderr


def test_crash_loop_fails_after_three_attempts_and_others_finish(daemon: Daemon) -> None:
    _bundle(daemon, "poison", prompt="CRASH the worker")
    daemon.start()
    job = daemon.wait_state("poison", "failed", timeout_s=90)
    assert job["attempts"] == 3 and job["error_code"] == "worker_crash"
    assert (daemon.outbox / "poison.error.json").exists()
    assert (daemon.outbox / "failed" / "poison" / "job.json").exists()
    kinds = [e["kind"] for e in daemon.events(job["id"])]
    assert kinds.count("retry") == 2
    _bundle(daemon, "after")
    daemon.wait_state("after", "done")


def test_transient_failure_retries_with_backoff(daemon: Daemon) -> None:
    _bundle(daemon, "oom", prompt="OOM please")
    _bundle(daemon, "broken", prompt="BROKEN please")
    daemon.start()
    oom = daemon.wait_state("oom", "failed", timeout_s=60)
    assert oom["error_code"] == "cuda_oom" and oom["attempts"] == 3
    retries = [json.loads(e["data_json"]) for e in daemon.events(oom["id"]) if e["kind"] == "retry"]
    assert [r["delay_s"] for r in retries] == [0.2, 0.4]
    broken = daemon.wait_state("broken", "failed")
    assert broken["attempts"] == 1 and broken["error_code"] == "render_error"


def test_commands_status_submit_cancel_retry_delete(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_job_bundle(src / "a", duration_s=1.0, seed=1)
    make_job_bundle(src / "b", duration_s=1.0, seed=2, prompt="SLOW one", sample_steps=20)
    daemon.start()
    assert daemon.cli("submit", str(src / "a")).returncode == 0
    loose = make_loose_job(src, "c", duration_s=1.0, seed=3)
    assert daemon.cli("submit", str(loose)).returncode == 0
    a = daemon.wait_state("a", "done")
    c = daemon.wait_state("c", "done")
    assert daemon.cli("submit", str(src / "b")).returncode == 0
    b = daemon.wait_for(
        lambda: (j := daemon.job("b")) and j["state"] == "running" and j["step"] and j, 30, "b runs"
    )

    status = json.loads(daemon.cli("status", "--json", check=True).stdout)
    assert status["counts"]["done"] == 2 and status["counts"]["running"] == 1
    assert {j["name"] for j in status["jobs"]} == {"a", "b", "c"}
    assert all(0.0 <= j["progress"] <= 1.0 for j in status["jobs"])
    human = daemon.cli("status", check=True).stdout
    assert "running" in human and "b" in human

    out = daemon.cli("cancel", b["id"])
    assert out.returncode == 0, out.stderr
    daemon.wait_state("b", "cancelled")
    assert daemon.cli("cancel", a["id"]).returncode == 1  # done jobs cannot be cancelled
    out = daemon.cli("retry", b["id"])
    assert out.returncode == 0, out.stderr
    daemon.wait_state("b", ("queued", "running", "retry_wait"))
    daemon.wait_for(lambda: daemon.job("b")["state"] == "running", 30, "b runs again")
    daemon.cli("cancel", b["id"], check=True)
    daemon.wait_state("b", "cancelled")

    out = daemon.cli("delete", a["id"])
    assert out.returncode == 0, out.stderr
    assert not (daemon.outbox / "a.mp4").exists() and not (daemon.outbox / "a.json").exists()
    row = daemon.job("a")
    assert row["state"] == "done" and row["deleted_at"] is not None
    assert [e["kind"] for e in daemon.events(a["id"])][-1] == "deleted"
    assert daemon.cli("delete", "nosuchjob").returncode == 1

    # a video removed from the outbox by hand is noticed: shown as deleted, not an error
    (daemon.outbox / "c.mp4").unlink()
    daemon.wait_for(lambda: daemon.job("c")["deleted_at"] is not None, 30, "hand deletion noticed")
    assert daemon.job("c")["state"] == "done"

    # with the daemon stopped, the commands apply requests themselves
    assert daemon.stop() == 0
    out = daemon.cli("delete", b["id"])
    assert out.returncode == 0, out.stderr
    assert daemon.job("b")["deleted_at"] is not None
    assert json.loads(daemon.cli("status", "--json", check=True).stdout)["counts"]["cancelled"] == 1
    assert c["state"] == "done"


def test_jobs_running_beside_a_poison_job_are_not_failed_by_it(tmp_path: Path) -> None:
    d = Daemon(tmp_path, env={"FAKE_PIPELINE_STEP_S": "0.2"})
    try:
        _bundle(d, "innocent1", seed=1, prompt="one")
        _bundle(d, "innocent2", seed=2, prompt="two")
        _bundle(d, "poison", seed=3, prompt="CRASH the worker")
        d.start()
        poison = d.wait_state("poison", "failed", timeout_s=120)
        assert poison["attempts"] == 3 and poison["error_code"] == "worker_crash"
        for name in ("innocent1", "innocent2"):
            job = d.wait_state(name, ("done", "failed"), timeout_s=60)
            assert job["state"] == "done", job
    finally:
        d.stop()


def test_sighup_reloads_caps_without_dropping_jobs(tmp_path: Path) -> None:
    d = Daemon(tmp_path, env={"FAKE_PIPELINE_STEP_S": "0.05"})
    try:
        d.start()
        d.wait_for(lambda: any(e["kind"] == "daemon" for e in d.events()), 30, "daemon started")
        d.config.write_text(d.config.read_text().replace("[defaults]", "max_running = 1\n[defaults]"))
        d.signal(signal.SIGHUP)
        d.wait_for(lambda: any("config reloaded" in e["data_json"] for e in d.events()), 30, "reload")
        for i in range(3):
            _bundle(d, f"hup{i}", seed=i, prompt=f"job {i}")
        peak = [0]

        def check() -> None:
            peak[0] = max(peak[0], d.counts().get("running", 0))

        d.wait_for(lambda: d.counts().get("done", 0) == 3, 60, "3 done", every=check)
        assert peak[0] == 1
        # a broken config on SIGHUP keeps the old one and the daemon serving
        d.config.write_text("max_running = \n")
        d.signal(signal.SIGHUP)
        time.sleep(1.0)
        assert d.proc is not None and d.proc.poll() is None
        assert "config not reloaded" in d.log.read_text()
    finally:
        d.stop()


def test_jobs_spread_across_several_workers(tmp_path: Path) -> None:
    d = Daemon(
        tmp_path, config={"devices": ["cpu", "cpu"], "max_running": 2}, env={"FAKE_PIPELINE_STEP_S": "0.2"}
    )
    try:
        d.start()
        d.wait_for(lambda: "model ready" in d.log.read_text(), 60, "the first worker")
        time.sleep(2.0)  # the second worker is ready too by now (the fake pipeline loads instantly)
        for i in range(2):
            _bundle(d, f"spread{i}", seed=i, prompt=f"job {i}")
        for i in range(2):
            d.wait_state(f"spread{i}", "done")
        pids = {
            json.loads((d.outbox / f"spread{i}.json").read_text())["model"]["worker_pid"] for i in range(2)
        }
        assert len(pids) == 2, pids  # one job per worker process (one resident model each)
        assert "started on cpu" in d.log.read_text()
    finally:
        d.stop()


def test_restart_finishes_a_publication_interrupted_between_files_and_ledger(tmp_path: Path) -> None:
    """The daemon died after recording where a result goes but before the ledger said done:
    the next start links the staged files and marks the job done, without rendering again."""
    from daemon.ledger import Ledger
    from tests.daemon.service.fake_pipeline import write_mp4

    d = Daemon(tmp_path, env={"FAKE_PIPELINE_STEP_S": "0.3"})
    _bundle(d, "pub")
    d.start()
    job = d.wait_for(
        lambda: (j := d.job("pub")) and j["state"] == "running" and j["step"] and j, 60, "running"
    )
    d.kill9()
    staging = d.outbox / ".partial" / job["id"]
    staging.mkdir(parents=True, exist_ok=True)
    write_mp4(staging / f"{job['id']}.mp4", frames=10)
    video, sidecar = d.outbox / "pub.mp4", d.outbox / "pub.json"
    (staging / "sidecar.json").write_text(
        json.dumps(
            {
                "job_id": job["id"],
                "state": "done",
                "frames": 10,
                "duration_s": 0.4,
                "outputs": {"video": str(video)},
            }
        )
    )
    ledger = Ledger(d.state / "ledger.sqlite3")
    ledger.set_columns(job["id"], output_video=str(video), output_json=str(sidecar))
    ledger.close()
    os.link(staging / f"{job['id']}.mp4", video)  # the first link made it, the sidecar's did not
    d.start()
    done = d.wait_state("pub", "done", timeout_s=30)
    d.stop()
    assert done["attempts"] == 1 and done["frames"] == 10
    assert json.loads(sidecar.read_text())["job_id"] == job["id"]
    assert [e["kind"] for e in d.events(job["id"])].count("started") == 1  # not rendered again
    assert not staging.exists()


def test_restart_finishes_a_claim_interrupted_after_the_rename(tmp_path: Path) -> None:
    """The daemon died after moving a bundle out of the inbox but before queueing it."""
    from daemon.ledger import Ledger

    d = Daemon(tmp_path)
    ledger = Ledger(d.state / "ledger.sqlite3")
    row = ledger.insert_job(
        name="half", source=str(d.inbox / "half"), state="waiting", waiting_reason="checking media"
    )
    job_dir = d.state / "jobs" / row.id
    ledger.set_columns(row.id, job_dir=str(job_dir))
    ledger.close()
    make_job_bundle(job_dir / "input", duration_s=1.0, seed=5)  # where the rename put it
    d.start()
    done = d.wait_state("half", "done", timeout_s=30)
    d.stop()
    assert done["id"] == row.id and done["spec_json"]
    assert [j["name"] for j in d.jobs()] == ["half"]


def _example_layout(inbox: Path, name: str, folder: str) -> Path:
    """The reference's example layout: `inbox/<name>.json` naming media in `inbox/<folder>/`."""
    staging = inbox.parent / f"src-{name}"
    make_job_bundle(staging, duration_s=1.0, seed=7)
    media = inbox / folder
    media.mkdir(parents=True)
    (staging / "face.png").rename(media / "ref_image.png")
    (staging / "voice.WAV").rename(media / "1.wav")
    doc = json.loads((staging / "job.json").read_text())
    doc["cond_video"] = f"{folder}/ref_image.png"
    doc["cond_audio"] = {"person1": f"{folder}/1.wav"}
    (inbox / f"{name}.json").write_text(json.dumps(doc))
    return media


def test_loose_jobs_with_media_in_a_subfolder_render_and_leave_it_in_place(tmp_path: Path) -> None:
    """`inbox/single_example_image.json` naming `examples/single/...` (the reference's layout):
    `examples/` is the loose jobs' media folder, not a bundle, while they name it; its files are
    copied at the claim, never moved, so a second job naming the same files renders too and the
    folder stays. Once no loose job names it, it is a bundle candidate like any folder: without a
    job.json it is rejected `incomplete` after incomplete_timeout_s, its files kept."""
    d = Daemon(tmp_path, config={"incomplete_timeout_s": 8})
    try:
        media = _example_layout(d.inbox, "single_example_image", "examples/single")
        doc = json.loads((d.inbox / "single_example_image.json").read_text())
        (d.inbox / "second.json").write_text(json.dumps({**doc, "seed": 12345}))
        before = {p.name: _sha256(p) for p in media.iterdir()}
        d.start()
        for name in ("single_example_image", "second"):
            job = d.wait_state(name, "done")
            assert json.loads(job["input_hashes_json"]) == {
                "examples/single/ref_image.png": before["ref_image.png"],
                "examples/single/1.wav": before["1.wav"],
            }
        assert {p.name: _sha256(p) for p in media.iterdir()} == before  # left in place, intact
        folder = d.wait_state("examples", "rejected", timeout_s=60)
        assert folder["error_code"] == "incomplete"
        assert (d.outbox / "failed" / "examples" / "single" / "1.wav").is_file()
        assert sorted(j["name"] for j in d.jobs()) == ["examples", "second", "single_example_image"]
    finally:
        d.stop()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_litter_in_a_bundle_named_failed_does_not_hold_it(daemon: Daemon) -> None:
    """OS and editor litter (Thumbs.db, desktop.ini, name~) is no upload in progress, and `failed`
    is a name like any other (the daemon keeps failures in outbox/failed/, never in the inbox)."""
    staging = daemon.inbox / ".failed.tmp"
    make_job_bundle(staging, duration_s=1.0, seed=11)
    for litter in ("Thumbs.db", "desktop.ini", "job.json~", ".DS_Store"):
        (staging / litter).write_bytes(b"litter")
    os.rename(staging, daemon.inbox / "failed")
    daemon.start()
    job = daemon.wait_state("failed", ("done", "rejected"))
    assert job["state"] == "done", job
    assert (daemon.outbox / "failed.mp4").stat().st_size > 0
    assert [j["name"] for j in daemon.jobs()] == ["failed"]
    assert list(daemon.inbox.iterdir()) == []
