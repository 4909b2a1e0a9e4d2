"""Videos and posters by job id: HTTP Range for seeking, HEAD, download, deleted outputs."""

from __future__ import annotations

from pathlib import Path

import av
from starlette.testclient import TestClient

from daemon.ledger import JobRow, Ledger
from tests.helpers.ledger import finish_job, queue_job, run_job


def _done(ledger: Ledger, outbox: Path, name: str = "alice") -> JobRow:
    job = queue_job(ledger, name)
    run_job(ledger, job.id)
    return finish_job(ledger, outbox, job.id, name)


def test_video_is_served_whole_and_is_a_real_h264_mp4(
    client: TestClient, ledger: Ledger, outbox: Path, tmp_path: Path
) -> None:
    job = _done(ledger, outbox)
    response = client.get(f"/jobs/{job.id}/video")
    assert response.status_code == 200
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-disposition"].startswith("inline")
    assert response.content == (outbox / "alice.mp4").read_bytes()
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(response.content)
    with av.open(str(copy)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def test_video_ranges_for_seeking(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    job = _done(ledger, outbox)
    data = (outbox / "alice.mp4").read_bytes()
    size = len(data)
    url = f"/jobs/{job.id}/video"

    part = client.get(url, headers={"range": "bytes=0-99"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 0-99/{size}"
    assert part.content == data[:100]

    tail = client.get(url, headers={"range": f"bytes={size - 50}-"})
    assert tail.status_code == 206 and tail.content == data[-50:]

    middle = client.get(url, headers={"range": "bytes=1000-1999"})
    assert middle.status_code == 206 and middle.content == data[1000:2000]

    beyond = client.get(url, headers={"range": f"bytes={size + 10}-{size + 20}"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"

    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(size) and head.content == b""


def test_download_link_is_an_attachment(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    job = _done(ledger, outbox)
    response = client.get(f"/jobs/{job.id}/video?download=1")
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="alice.mp4"'


def test_poster(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    job = _done(ledger, outbox)
    response = client.get(f"/jobs/{job.id}/poster")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content[:3] == b"\xff\xd8\xff"


def test_no_video_before_done_or_after_delete(client: TestClient, ledger: Ledger, outbox: Path) -> None:
    job = _done(ledger, outbox, "gone")
    (outbox / "gone.mp4").unlink()  # removed by hand: the ledger still says done
    assert client.get(f"/jobs/{job.id}/video").status_code == 410

    kept = _done(ledger, outbox, "deleted")
    ledger.mark_deleted(kept.id, reason="infinitetalk delete")
    assert client.get(f"/jobs/{kept.id}/video").status_code == 410
    assert client.get(f"/jobs/{kept.id}/poster").status_code == 410
    view = client.get(f"/api/jobs/{kept.id}").json()["job"]
    assert view["urls"]["video"] is None and view["deleted_at"] is not None

    queued = queue_job(ledger, "queued")
    assert client.get(f"/jobs/{queued.id}/video").status_code == 404
    assert "state queued" in client.get(f"/jobs/{queued.id}/video").text
    assert client.get("/jobs/unknownjob/video").status_code == 404


def test_files_while_the_ledger_is_missing(client: TestClient) -> None:
    response = client.get("/jobs/abc123/video")
    assert response.status_code == 503 and "no such file" in response.text
