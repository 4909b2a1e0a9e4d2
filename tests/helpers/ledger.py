"""Jobs written into a real ledger through daemon/ledger.py, as the daemon would write them: queued,
running with progress, done with a real H.264 MP4 and JPEG poster in the outbox. For the tests of
the ledger's readers (the dashboard)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.ledger import JobRow, Ledger
from tests.helpers.media import make_image, make_mp4

SPEC = {
    "size": "infinitetalk-480",
    "sample_steps": 4,
    "seed": 42,
    "mode": "streaming",
    "sample_audio_guide_scale": 2.0,
    "prompt": "A woman talks in a bright studio.",
    "cond_video": "face.png",
    "cond_audio": {"person1": "voice.wav"},
    "audio_type": "para",
}


def queue_job(ledger: Ledger, name: str, **columns: object) -> JobRow:
    columns.setdefault("spec_json", json.dumps(SPEC))
    return ledger.insert_job(name=name, source=f"inbox/{name}", state="queued", **columns)


def run_job(ledger: Ledger, job_id: str, *, chunk: int = 1, step: int = 2) -> None:
    claimed = ledger.claim_next(max_running=3)
    assert claimed is not None and claimed.id == job_id, claimed
    ledger.update_progress(
        job_id,
        progress=((chunk - 1) * 4 + step) / 8,
        chunk=chunk,
        num_chunks=2,
        step=step,
        num_steps=4,
        stage="denoise",
    )


def reject_job(ledger: Ledger, name: str, code: str, message: str) -> JobRow:
    """A loose job `<name>.json` rejected at intake, its JSON named as the bad field."""
    return ledger.insert_job(
        name=name,
        source=f"inbox/{name}.json",
        state="rejected",
        error_code=code,
        error_message=message,
        error_field=f"{name}.json",
    )


def fail_job(ledger: Ledger, job_id: str, expected: str, code: str, message: str) -> JobRow:
    """`expected -> failed` for good, with the error code and message."""
    return ledger.transition(
        job_id, expected, "failed", finished_at=ledger.clock(), error_code=code, error_message=message
    )


def long_job(ledger: Ledger, name: str, *, updates: int = 3000) -> JobRow:
    """A running job with `updates` progress events (75 chunks of 40 steps: a ten-minute video's
    worth), written in one transaction."""
    job = queue_job(ledger, name)
    run_job(ledger, job.id)
    with ledger.tx():
        for k in range(updates):
            ledger.update_progress(
                job.id,
                progress=k / updates,
                chunk=k // 40,
                num_chunks=75,
                step=k % 40,
                num_steps=40,
                stage="denoise",
            )
    return job


def publish_outputs(
    outbox: Path, name: str, *, duration_s: float = 3.0, width: int = 160, height: int = 96
) -> tuple[Path, Path]:
    video = make_mp4(outbox / f"{name}.mp4", duration_s=duration_s, width=width, height=height)
    poster = make_image(outbox / f"{name}.jpg", width=width, height=height)
    return video, poster


def finish_job(ledger: Ledger, outbox: Path, job_id: str, name: str, *, duration_s: float = 3.0) -> JobRow:
    video, poster = publish_outputs(outbox, name, duration_s=duration_s)
    return ledger.transition(
        job_id,
        "running",
        "done",
        finished_at=ledger.clock(),
        progress=1.0,
        output_video=str(video),
        output_poster=str(poster),
        output_json=str(outbox / f"{name}.json"),
        duration_s=duration_s,
        frames=int(duration_s * 25),
        render_s=12.5,
        stage="done",
    )
