"""Issue 19's job commands through the real daemon process and the real CLI (fake pipeline):
re-render on request ("rerender": true, `retry` of a done job), job references (id prefix, name,
ambiguity), cancel requests from the inbox's control folder (hostile files included), and
`submit` naming the job and following it with `--wait`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.media import make_job_bundle

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "tree", config={"max_running": 1})
    yield d
    d.stop()


def _bundle(d: Daemon, name: str, **settings: object) -> Path:
    staging = d.inbox / f".{name}.tmp"
    make_job_bundle(staging, duration_s=settings.pop("duration_s", 1.0), **settings)
    os.rename(staging, d.inbox / name)
    return d.inbox / name


def _status_job(d: Daemon, job_id: str) -> dict[str, object]:
    status = json.loads(d.cli("status", "--json", "--limit", "1000", check=True).stdout)
    return next(j for j in status["jobs"] if j["id"] == job_id)


def test_rerender_key_renders_an_identical_job_again_linked_to_the_first(daemon: Daemon) -> None:
    _bundle(daemon, "first", seed=5)
    daemon.start()
    first = daemon.wait_state("first", "done")
    _bundle(daemon, "again", seed=5)  # identical: still a duplicate without the key
    assert daemon.wait_state("again", "rejected")["duplicate_of"] == first["id"]
    _bundle(daemon, "forced", seed=5, rerender=True)
    forced = daemon.wait_state("forced", "done")
    assert forced["rerender_of"] == first["id"] and forced["error_code"] is None
    assert Path(forced["output_video"]).is_file() and Path(first["output_video"]).is_file()
    assert _status_job(daemon, forced["id"])["rerender_of"] == first["id"]
    _bundle(daemon, "bad", seed=5, rerender="yes")
    assert daemon.wait_state("bad", "rejected")["error_code"] == "bad_type"


def test_retry_of_a_done_job_renders_it_again_as_a_new_linked_job(daemon: Daemon) -> None:
    _bundle(daemon, "anna", seed=7)
    daemon.start()
    first = daemon.wait_state("anna", "done")
    out = daemon.cli("retry", "anna")  # by name: the newest job of that name
    assert out.returncode == 0, out.stderr
    assert f"is job {first['id']}" in out.stdout and "renders again as the new job" in out.stdout
    daemon.wait_for(lambda: len([j for j in daemon.jobs() if j["name"] == "anna"]) == 2, 30, "new job")
    again = daemon.wait_state("anna", "done")
    assert again["id"] != first["id"] and again["rerender_of"] == first["id"]
    assert again["output_video"] != first["output_video"]
    assert Path(again["output_video"]).is_file() and Path(first["output_video"]).is_file()
    assert json.loads(again["spec_json"])["seed"] == 7
    # its inputs: the done job's claimed files, linked (not copied again), in a folder of its own
    new_input, old_input = Path(again["job_dir"]) / "input", Path(first["job_dir"]) / "input"
    assert new_input != old_input
    assert (new_input / "voice.WAV").stat().st_ino == (old_input / "voice.WAV").stat().st_ino
    # once its claimed inputs are gone (deleted), a done job cannot be rendered again: said so
    assert daemon.cli("delete", first["id"]).returncode == 0
    out = daemon.cli("retry", first["id"])
    assert out.returncode == 1 and "claimed inputs are gone" in out.stderr
    # with the daemon stopped, the command makes the new job itself; the next daemon renders it
    assert daemon.stop() == 0
    out = daemon.cli("retry", again["id"][:5])
    assert out.returncode == 0, out.stderr
    third = daemon.job("anna")
    assert third["rerender_of"] == again["id"] and third["state"] == "queued"
    daemon.start()
    assert daemon.wait_state("anna", "done")["id"] == third["id"]


def test_commands_take_an_id_prefix_or_a_name_and_refuse_an_ambiguous_one(daemon: Daemon) -> None:
    _bundle(daemon, "slow", seed=1, prompt="SLOW one", sample_steps=40)
    daemon.start()
    slow = daemon.wait_state("slow", "running")
    _bundle(daemon, "waits", seed=2)
    waits = daemon.wait_state("waits", "queued")
    out = daemon.cli("cancel", "waits")  # by name
    assert out.returncode == 0, out.stderr
    assert f"'waits' (newest of that name) is job {waits['id']}" in out.stdout
    daemon.wait_state("waits", "cancelled")
    out = daemon.cli("cancel", "waits")  # no active job of that name left
    assert out.returncode == 1 and "no job named 'waits'" in out.stderr
    out = daemon.cli("cancel", slow["id"][:6])  # a unique prefix
    assert out.returncode == 0, out.stderr
    assert f"(id prefix) is job {slow['id']}" in out.stdout
    daemon.wait_state("slow", "cancelled")
    # a job whose name is another job's id prefix: ambiguous, nothing done, both listed
    prefix = slow["id"][:4]
    _bundle(daemon, prefix, seed=3)
    named = daemon.wait_state(prefix, "done")
    out = daemon.cli("delete", prefix)
    assert out.returncode == 1 and "ambiguous" in out.stderr
    assert slow["id"] in out.stderr and named["id"] in out.stderr
    assert daemon.job(prefix)["deleted_at"] is None
    assert daemon.cli("delete", "nosuchjob").returncode == 1
    # with the daemon stopped, the command resolves the reference itself
    assert daemon.stop() == 0
    out = daemon.cli("delete", named["id"][:8])
    assert out.returncode == 0, out.stderr
    assert daemon.job(prefix)["deleted_at"] is not None


def test_upload_group_cancel_through_the_inbox_control_folder(daemon: Daemon, tmp_path: Path) -> None:
    _bundle(daemon, "slow", seed=1, prompt="SLOW one", sample_steps=40)
    daemon.start()
    slow = daemon.wait_state("slow", "running")
    _bundle(daemon, "queued1", seed=2)
    _bundle(daemon, "queued2", seed=3)
    daemon.wait_state("queued2", "queued")
    out = daemon.cli("cancel", "--inbox", "queued1")
    assert out.returncode == 0, out.stderr
    daemon.wait_state("queued1", "cancelled")
    # only waiting or queued jobs: a running job needs an operator
    out = daemon.cli("cancel", "--inbox", slow["id"])
    assert out.returncode == 1 and "only stops waiting or queued jobs" in out.stderr
    assert daemon.job("slow")["state"] == "running"

    control = daemon.inbox / ".control"
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"action": "cancel", "job": "queued2"}))
    request = json.dumps({"action": "cancel", "job": "queued2"})
    (control / "link.json").symlink_to(secret)  # never followed
    os.link(secret, control / "hard.json")  # a hard link to another file: refused
    os.mkfifo(control / "fifo.json")  # would block a reader: never opened
    (control / "big.json").write_text(request + " " * 5000)
    (control / "delete.json").write_text(json.dumps({"action": "delete", "job": "queued2"}))
    (control / "retry.json").write_text(json.dumps({"action": "retry", "job": "queued2"}))
    (control / "junk.json").write_bytes(b"\xff\x00not json")
    (control / "weird name;rm.json").write_text(request)
    (control / "folder.json").mkdir()

    def answered(name: str) -> dict[str, object] | None:
        path = control / f"{name}.answer.json"
        return json.loads(path.read_text()) if path.exists() else None

    for name in ("link", "hard", "fifo", "big", "delete", "retry", "junk"):
        answer = daemon.wait_for(lambda name=name: answered(name), 30, f"answer to {name}")
        assert answer["ok"] is False, (name, answer)
        assert not (control / f"{name}.json").exists()
    assert "not a regular file" in answered("link")["message"]  # type: ignore[operator]
    assert "hard link" in answered("hard")["message"]  # type: ignore[operator]
    assert "larger than" in answered("big")["message"]  # type: ignore[operator]
    assert "only 'cancel'" in answered("delete")["message"]  # type: ignore[operator]
    assert secret.read_text() == request  # untouched
    daemon.wait_for(lambda: not (control / "weird name;rm.json").exists(), 30, "odd name removed")
    assert (control / "folder.json").is_dir()
    assert daemon.job("queued2")["state"] == "queued"  # none of these cancelled it
    assert daemon.proc is not None and daemon.proc.poll() is None
    out = daemon.cli("cancel", "--inbox", "queued2")
    assert out.returncode == 0, out.stderr
    daemon.wait_state("queued2", "cancelled")
    # the control folder is no job: nothing in the ledger came from it
    assert not [j for j in daemon.jobs() if ".control" in j["source"]]


def test_a_control_folder_that_is_a_link_is_not_used(daemon: Daemon, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "req.json").write_text(json.dumps({"action": "cancel", "job": "x"}))
    (daemon.inbox / ".control").symlink_to(elsewhere)
    _bundle(daemon, "one", seed=1)
    daemon.start()
    daemon.wait_state("one", "done")
    assert (elsewhere / "req.json").exists() and not (elsewhere / "req.answer.json").exists()
    assert "inbox control folder" in daemon.log.read_text()


def test_submit_prints_the_name_and_wait_follows_the_job_to_its_end(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_job_bundle(src / "talk", duration_s=1.0, seed=4)
    make_job_bundle(src / "broken", duration_s=1.0, seed=5, prompt="BROKEN job")
    daemon.start()
    out = daemon.cli("submit", str(src / "talk"), "--wait", "--timeout", "120")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("submitted job talk as ")
    job = daemon.job("talk")
    assert job is not None and job["state"] == "done" and lines[-1] == job["output_video"]
    assert Path(lines[-1]).is_file()
    # the same again: rejected as a duplicate, exit 1 with the code and message
    out = daemon.cli("submit", str(src / "talk"), "--wait", "--timeout", "120")
    assert out.returncode == 1 and "rejected: duplicate" in out.stderr
    assert out.stdout.startswith("submitted job talk as ")  # the same inbox name, a new job
    out = daemon.cli("submit", str(src / "broken"), "--wait", "--timeout", "120")
    assert out.returncode == 1 and "failed:" in out.stderr
    # without --wait: the name, at once
    out = daemon.cli("submit", str(src / "talk"), "--name", "later")
    assert out.returncode == 0 and out.stdout.startswith("submitted job later as ")
