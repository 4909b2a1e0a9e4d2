"""`Endings.recover()`: what a daemon killed between files and ledger left half done is finished
(or undone) by the row's `intent`, and rows of a ledger written before the `intent` column by
the column combination that version used. A real SQLite ledger, real files in tmp_path, and the
real `Intake` as the `Uploads` that move a rejected or claimed upload."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.endings import Endings
from daemon.errors import JobRejected
from daemon.intake import Intake
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox, Published
from daemon.states import Intent
from tests.helpers.media import make_job_bundle


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    for name in ("inbox", "outbox", "var"):
        (tmp_path / name).mkdir()
    settings = Settings(
        inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", state_dir=tmp_path / "var", settle_s=0.0
    )
    ledger = Ledger(settings.ledger_path)
    outbox = Outbox(settings.outbox)
    outbox.ensure()
    endings = Endings(settings, ledger, outbox)
    intake = Intake(settings, ledger, outbox, endings=endings)
    yield {"settings": settings, "ledger": ledger, "outbox": outbox, "endings": endings, "intake": intake}
    intake.close()
    ledger.close()


def running(ledger: Ledger, name: str) -> JobRow:
    ledger.insert_job(name=name, source=f"/inbox/{name}", state="queued")
    row = ledger.claim_next(max_running=5)
    assert row is not None and row.state == "running"
    return row


def staged(env: dict[str, Any], row: JobRow, *, intent: bool = True) -> Published:
    """Phase 1 of a publication and its recorded intent (a daemon killed before the links)."""
    outbox: Outbox = env["outbox"]
    staging = outbox.staging_dir(row.id)
    (staging / f"{row.id}.mp4").write_bytes(b"video")
    published = outbox.stage_publication(
        job_id=row.id, name=row.name, video=staging / f"{row.id}.mp4", poster=None, sidecar={"frames": 9}
    )
    env["ledger"].set_columns(
        row.id,
        output_video=str(published.video),
        output_json=str(published.sidecar),
        outputs_identity=published.identity_json(),
        **({"intent": Intent.publish.value} if intent else {}),
    )
    return published


@pytest.mark.parametrize("intent", [True, False], ids=["intent", "legacy-row"])
def test_a_staged_publication_is_finished(env: dict[str, Any], intent: bool) -> None:
    row = running(env["ledger"], "talk")
    published = staged(env, row, intent=intent)
    env["endings"].recover()
    done = env["ledger"].get(row.id)
    assert done.state == "done" and done.intent is None and done.frames == 9
    assert published.video.read_bytes() == b"video" and published.sidecar.exists()


def test_a_publication_whose_staging_is_gone_is_taken_back(env: dict[str, Any]) -> None:
    row = running(env["ledger"], "talk")
    published = staged(env, row)
    os.link(env["outbox"].partial / row.id / f"{row.id}.mp4", published.video)  # one link made
    (env["outbox"].partial / row.id / f"{row.id}.mp4").unlink()  # ...and the staging lost
    env["endings"].recover()
    again = env["ledger"].get(row.id)
    assert again.state == "running" and again.output_video is None and again.intent is None
    assert not published.video.exists()  # proven ours by its identity: unlinked


def test_a_failure_under_way_is_written_and_failed(env: dict[str, Any]) -> None:
    ledger: Ledger = env["ledger"]
    row = running(ledger, "broken")
    input_dir = env["settings"].jobs_dir / row.id / "input"
    input_dir.mkdir(parents=True)
    (input_dir / "job.json").write_text("{}")
    kept = env["outbox"].keep_originals(row.name, [])
    error_path = env["settings"].outbox / "broken.error.json"
    ledger.set_columns(
        row.id,
        error_code="render_error",
        error_message="RuntimeError: no",
        output_json=str(error_path),
        originals=str(kept),
        intent=Intent.fail.value,
    )
    env["endings"].recover()
    failed = ledger.get(row.id)
    assert failed.state == "failed" and failed.intent is None
    assert json.loads(error_path.read_text())["code"] == "render_error"
    assert (kept / "job.json").exists()


def test_running_rows_are_left_to_the_start_up_call(env: dict[str, Any]) -> None:
    """The scan's call (with the uploads) never touches a running row, whatever its columns."""
    row = running(env["ledger"], "talk")
    staged(env, row)
    env["endings"].recover(env["intake"])
    assert env["ledger"].get(row.id).state == "running"


def _rejection_intent(env: dict[str, Any], row: JobRow, *, intent: bool) -> Path:
    """The first write of a rejection, as `Endings.reject` makes it, and nothing after it."""
    kept = env["outbox"].keep_originals(row.name, [])
    env["ledger"].set_columns(
        row.id,
        error_code="bad_value",
        error_message="steps must be 1 or more",
        output_json=str(env["settings"].outbox / f"{row.name}.error.json"),
        originals=str(kept),
        **({"intent": Intent.reject.value} if intent else {}),
    )
    return kept


@pytest.mark.parametrize("intent", [True, False], ids=["intent", "legacy-row"])
def test_a_rejection_under_way_moves_the_upload_and_rejects(env: dict[str, Any], intent: bool) -> None:
    ledger: Ledger = env["ledger"]
    bundle = make_job_bundle(env["settings"].inbox / "bad", duration_s=0.5)
    row = ledger.insert_job(name="bad", source=str(bundle), state="waiting")
    kept = _rejection_intent(env, row, intent=intent)
    env["endings"].recover(env["intake"])
    rejected = ledger.get(row.id)
    assert rejected.state == "rejected" and rejected.intent is None
    assert not bundle.exists() and (kept / "job.json").exists()
    error = json.loads((env["settings"].outbox / "bad.error.json").read_text())
    assert error["code"] == "bad_value" and error["originals"] == str(kept)


def test_a_claim_interrupted_after_the_rename_is_finished(env: dict[str, Any]) -> None:
    ledger: Ledger = env["ledger"]
    settings: Settings = env["settings"]
    row = ledger.insert_job(name="solo", source=str(settings.inbox / "solo"), state="waiting")
    job_dir = settings.jobs_dir / row.id
    make_job_bundle(job_dir / "upload", duration_s=0.5)  # renamed off the inbox, not yet copied
    ledger.set_columns(row.id, job_dir=str(job_dir), intent=Intent.claim.value)
    env["endings"].recover(env["intake"])
    queued = ledger.get(row.id)
    assert queued.state == "queued" and queued.intent is None and queued.spec_json
    assert (job_dir / "input" / "job.json").exists() and not (job_dir / "upload").exists()


def test_a_claim_whose_upload_is_back_in_the_inbox_is_left_to_the_scan(env: dict[str, Any]) -> None:
    ledger: Ledger = env["ledger"]
    settings: Settings = env["settings"]
    bundle = make_job_bundle(settings.inbox / "solo", duration_s=0.5)
    row = ledger.insert_job(name="solo", source=str(bundle), state="waiting")
    job_dir = settings.jobs_dir / row.id
    make_job_bundle(job_dir / "upload", duration_s=0.5)
    ledger.set_columns(row.id, job_dir=str(job_dir), intent=Intent.claim.value)
    env["intake"]._present = {str(bundle)}
    env["endings"].recover(env["intake"])
    assert ledger.get(row.id).state == "waiting" and not (job_dir / "input").exists()


def test_reject_records_the_intent_first_and_clears_it(env: dict[str, Any]) -> None:
    """`reject` hands the file move the row as the intent left it (the originals reserved)."""
    ledger: Ledger = env["ledger"]
    row = ledger.insert_job(name="dup", source="/inbox/dup", state="waiting")
    seen: list[JobRow] = []
    env["endings"].reject(
        row, JobRejected("duplicate", "same as job x", field="", duplicate_of="x"), seen.append
    )
    [during] = seen
    assert during.intent == "reject" and during.originals and Path(during.originals).is_dir()
    after = ledger.get(row.id)
    assert after.state == "rejected" and after.intent is None and after.duplicate_of == "x"
    assert json.loads(Path(str(after.output_json)).read_text())["duplicate_of"] == "x"
