"""Fixtures for the dashboard tests: a real ledger written through daemon/ledger.py, a real
outbox with a real H.264 MP4 and JPEG poster, and the app under Starlette's TestClient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from daemon.ledger import JobRow, Ledger
from dashboard.app import create_app
from dashboard.config import DashboardConfig
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


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    path = tmp_path / "outbox"
    path.mkdir()
    return path


@pytest.fixture
def ledger(state_dir: Path) -> Iterator[Ledger]:
    led = Ledger(state_dir / "ledger.sqlite3")
    yield led
    led.close()


@pytest.fixture
def cfg(state_dir: Path, outbox: Path) -> DashboardConfig:
    return DashboardConfig(ledger_path=state_dir / "ledger.sqlite3", outbox=outbox, poll_s=0.05, ping_s=0)


@pytest.fixture
def client(cfg: DashboardConfig) -> Iterator[TestClient]:
    with TestClient(create_app(cfg), base_url="http://127.0.0.1:8000") as c:
        yield c


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
