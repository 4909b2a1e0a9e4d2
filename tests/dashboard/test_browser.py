"""The page as a person sees it: real uvicorn, real headless Chromium (Debian's), a real ledger.

The test writes the ledger as the daemon would and watches the open page follow a job from the
queue to rendering to a finished video, plays that video (H.264 + AAC MP4, fetched with HTTP
Range) and seeks in it, opens the job's page with its history, and sees the page carry on when
the ledger disappears and comes back. Screenshots are captured over CDP; with
INFINITETALK_SCREENSHOT_DIR set they are also copied there (that is how docs/img/ is made).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from daemon.ledger import Ledger
from tests.dashboard.cdp import Browser, Page, shot, text_of
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.helpers.ledger import SPEC, fail_job, finish_job, queue_job, reject_job, run_job
from tests.helpers.proc import free_port

pytestmark = pytest.mark.timeout(180)


def _shot(page: Page, tmp_path: Path, name: str) -> Path:
    path = shot(page, tmp_path, name)
    with Image.open(path) as img:
        assert img.format == "PNG" and 1200 <= img.width <= 1280 and img.height >= 600, img.size
    return path


def test_page_follows_a_job_from_queue_to_video(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path, browser: Browser
) -> None:
    reject_job(ledger, "broken-upload", "BAD_JSON", "job.json line 4: trailing comma")
    ledger.insert_job(
        name="bob-interview",
        source="inbox/bob-interview",
        state="waiting",
        waiting_reason="incomplete upload",
    )
    ledger.daemon_event("started", pid=4242)
    port = free_port()
    config = write_config(tmp_path / "infinitetalk.toml", state_dir=state_dir, outbox=outbox, port=port)
    with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
        page = browser.page
        page.goto(url + "/")
        page.wait_for(
            "document.body.dataset.ready === '1' && document.getElementById('conn').dataset.state === 'live'"
        )
        page.wait_for(f"{text_of('#daemon')}.startsWith('daemon started')")
        page.wait_for(f"{text_of('#waiting-list')}.includes('incomplete upload')")
        problems = page.evaluate(text_of("#problems-list"))
        assert "BAD_JSON" in problems and "trailing comma" in problems and "broken-upload.json" in problems
        assert page.evaluate("document.querySelector('#queue .empty').hidden") is False

        # queued: the job appears in the queue, in order, without a reload
        alice = queue_job(ledger, "alice-studio")
        two = SPEC | {"cond_audio": {"person1": "a.wav", "person2": "b.wav"}, "audio_type": "add"}
        queue_job(ledger, "carol-podcast", spec_json=json.dumps(two))
        page.wait_for("document.querySelectorAll('#queue-list tr').length === 2")
        assert page.evaluate(
            "[...document.querySelectorAll('#queue-list tr')].map(r => r.children[1].textContent)"
        ) == ["alice-studio", "carol-podcast"]
        page.wait_for("document.querySelector('#counts [data-state=queued] .n').textContent === '2'")
        assert "2 speakers (add)" in page.evaluate(text_of("#queue-list tr:nth-child(2)"))

        # running: a progress bar with chunk and step, elapsed time and ETA
        run_job(ledger, alice.id, chunk=1, step=2)
        card = f"#running-list [data-key='{alice.id}']"
        page.wait_for(f"{text_of(card)}.includes('chunk 1/2 · step 2/4')")
        assert page.evaluate(f'document.querySelector("{card} progress").value') == 0.25
        assert page.evaluate("document.querySelectorAll('#queue-list tr').length") == 1
        ledger.update_progress(
            alice.id, progress=0.875, chunk=2, num_chunks=2, step=3, num_steps=4, stage="denoise"
        )
        page.wait_for(f"{text_of(card)}.includes('chunk 2/2 · step 3/4 · denoise · 88%')")
        assert page.evaluate(f'document.querySelector("{card} progress").value') == 0.875
        page.wait_for(f"/ETA \\d+:\\d\\d/.test({text_of(card + ' .times')})")
        assert "elapsed" in page.evaluate(text_of(card + " .times"))
        _shot(page, tmp_path, "dashboard-rendering.png")

        # done: the card leaves, a video appears in the grid with its facts and a download link
        finish_job(ledger, outbox, alice.id, "alice-studio", duration_s=3.0)
        tile = f"#finished-list [data-key='{alice.id}']"
        page.wait_for(f'!!document.querySelector("{tile} video")')
        page.wait_for("document.querySelectorAll('#running-list > *').length === 0")
        facts = page.evaluate(text_of(tile))
        assert "alice-studio" in facts and "0:03 video" in facts and "rendered in 0:13" in facts
        assert "480p" in facts and "seed 42" in facts
        assert (
            page.evaluate(f"document.querySelector(\"{tile} a[download]\").getAttribute('href')")
            == f"/jobs/{alice.id}/video?download=1"
        )
        assert page.evaluate(f'document.querySelector("{tile} video").poster').endswith(
            f"/jobs/{alice.id}/poster"
        )

        # play it, then seek: the browser fetches it with Range requests
        video = f'document.querySelector("{tile} video")'
        assert (
            page.evaluate(f"{video}.canPlayType('video/mp4; codecs=\"avc1.640015, mp4a.40.2\"')")
            == "probably"
        )
        page.evaluate(f"(() => {{ const v = {video}; v.muted = true; v.preload = 'auto'; v.load(); }})()")
        page.wait_for(f"{video}.readyState >= 3", timeout_s=30)
        assert page.evaluate(f"{video}.duration") == pytest.approx(3.0, abs=0.1)
        page.evaluate(f"{video}.play()", await_promise=True)
        page.wait_for(f"{video}.currentTime > 0.2", timeout_s=30)
        page.evaluate(f"{video}.pause(); {video}.currentTime = 2.2")
        page.wait_for(f"!{video}.seeking && Math.abs({video}.currentTime - 2.2) < 0.05", timeout_s=30)
        page.wait_for(f"{video}.readyState >= 2", timeout_s=30)
        assert page.evaluate(f"{video}.error") is None
        page.pump(0.3)
        statuses = {r["status"] for r in page.responses if r["url"].endswith(f"/jobs/{alice.id}/video")}
        assert 206 in statuses, page.responses
        page.evaluate(f"{video}.currentTime = 0.6")
        page.wait_for(f"!{video}.seeking && {video}.readyState >= 2")
        _shot(page, tmp_path, "dashboard-finished.png")

        # the job's own page: a timeline of its state events (progress is the chart), and every
        # raw event, in order, behind a link
        page.goto(f"{url}/jobs/{alice.id}")
        page.wait_for("document.body.dataset.ready === '1'")
        kinds = page.evaluate(
            "[...document.querySelectorAll('#timeline tr')].map(r => r.children[2].textContent)"
        )
        assert kinds == ["created", "queued", "started", "done"]
        assert "alice-studio" in page.evaluate(text_of("#job-name"))
        assert page.evaluate("!!document.querySelector('#job-video video')")
        _shot(page, tmp_path, "dashboard-job.png")
        page.goto(f"{url}/jobs/{alice.id}?events=1")
        page.wait_for("document.body.dataset.ready === '1'")
        kinds = page.evaluate(
            "[...document.querySelectorAll('#history tr')].map(r => r.children[2].textContent)"
        )
        assert kinds == ["created", "queued", "started", "progress", "progress", "done"]

        # the daemon's ledger goes away (a new state dir, say): a clear note; when it returns, live again
        page.goto(url + "/")
        page.wait_for(f'!!document.querySelector("{tile}")')
        ledger.daemon_event("stopped", pid=4242)
        page.wait_for("document.getElementById('daemon').dataset.state === 'stopped'")
        assert page.evaluate(text_of("#daemon")).startswith("daemon stopped")
        ledger.close()
        moved = state_dir.with_name("var-away")
        state_dir.rename(moved)
        page.wait_for("!document.getElementById('ledger-note').hidden")
        assert "cannot be read" in page.evaluate(text_of("#ledger-note"))
        page.wait_for("document.querySelectorAll('#finished-list > *').length === 0")
        _shot(page, tmp_path, "dashboard-no-ledger.png")
        moved.rename(state_dir)
        page.wait_for("document.getElementById('ledger-note').hidden")
        page.wait_for(f'!!document.querySelector("{tile} video")')
        again = Ledger(state_dir / "ledger.sqlite3")
        try:
            carol = again.claim_next(max_running=3)
            assert carol is not None and carol.name == "carol-podcast"
            page.wait_for(f"!!document.querySelector(\"#running-list [data-key='{carol.id}']\")")
            # a transient failure: back in the queue, waiting for its retry
            again.transition(
                carol.id,
                "running",
                "retry_wait",
                next_attempt_at=again.clock() + 60,
                error_code="CUDA_OOM",
                error_message="CUDA out of memory",
            )
            row = f"#queue-list [data-key='{carol.id}']"
            page.wait_for(f"{text_of(row)}.includes('retry 1 at')")
            assert page.evaluate(f'document.querySelector("{row} .pos").textContent') == "retry"
            # then it fails for good: listed with its code and message
            fail_job(again, carol.id, "retry_wait", "CRASH_LOOP", "the worker died 3 times on this job")
            failed = f"#problems-list [data-key='{carol.id}']"
            page.wait_for(f"{text_of(failed)}.includes('CRASH_LOOP')")
            assert "the worker died 3 times" in page.evaluate(text_of(failed))
            assert page.evaluate("document.querySelectorAll('#queue-list tr').length") == 0
            # a busy day: the grid keeps the newest 48 videos, newest first
            for i in range(50):
                extra = again.insert_job(name=f"batch-{i:02d}", source=f"inbox/batch-{i:02d}", state="queued")
                again.transition(extra.id, "queued", "running", started_at=again.clock())
                again.transition(
                    extra.id,
                    "running",
                    "done",
                    finished_at=again.clock() + i,
                    render_s=5.0,
                    output_video=str(outbox / "alice-studio.mp4"),
                )
            page.wait_for(f"{text_of('#finished-list > :first-child h3')} === 'batch-49'")
            assert page.evaluate("document.querySelectorAll('#finished-list > *').length") == 48
        finally:
            again.close()
    assert page.errors == [], page.errors
