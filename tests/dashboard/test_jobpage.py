"""The pages at scale as a person sees them: real uvicorn, real headless Chromium, real ledger.

- the main page's "All jobs" list: search, state filter and paging, all in the URL;
- a job with 3,000 progress events: a summary (chart, a short timeline, attempts, failure
  details) and the raw events paged behind a link; a page that stays short;
- 1400 px and 400 px screenshots (kept under tmp_path, and in INFINITETALK_SCREENSHOT_DIR when
  set); at 400 px nothing scrolls sideways and no table cell is squeezed to a sliver;
- accessibility basics from Chromium's own accessibility tree: landmarks, and a name for every
  link, button, field and video;
- the "daemon down since ..." banner after a real `kill -9` of a real daemon, and the running
  job no longer shown as live.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from daemon.ledger import Ledger
from tests.dashboard.cdp import Browser, Page, shot, text_of
from tests.dashboard.server_proc import dashboard_server, write_config
from tests.helpers.daemon import Daemon
from tests.helpers.ledger import SPEC, fail_job, finish_job, long_job, queue_job, run_job
from tests.helpers.media import make_job_bundle
from tests.helpers.proc import free_port

pytestmark = pytest.mark.timeout(180)


def _viewport(page: Page, width: int, height: int = 900) -> None:
    page.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=width < 600,
    )


def _fill(ledger: Ledger, n: int) -> list[str]:
    ids = []
    with ledger.tx():
        for i in range(n):
            spec = SPEC | {"prompt": f"take {i} on a {'sunny beach' if i % 10 == 0 else 'stage'}"}
            row = ledger.insert_job(
                name=f"clip-{i:03d}", source=f"inbox/clip-{i:03d}", state="queued", spec_json=json.dumps(spec)
            )
            ids.append(row.id)
        ledger.conn.execute(
            "UPDATE jobs SET state = 'rejected', error_code = 'bad_json', finished_at = created_at"
            " WHERE seq % 7 = 0 AND state = 'queued'"
        )
    return ids


def _a11y_problems(page: Page) -> list[str]:
    """Interactive nodes without an accessible name, and missing landmarks (Chromium's tree)."""
    nodes = page.call("Accessibility.getFullAXTree")["nodes"]
    problems, roles = [], set()
    for node in nodes:
        if node.get("ignored"):
            continue
        role = (node.get("role") or {}).get("value", "")
        roles.add(role)
        name = (node.get("name") or {}).get("value", "")
        if (
            role in ("link", "button", "textbox", "searchbox", "combobox", "video", "image")
            and not str(name).strip()
        ):
            problems.append(f"{role} without a name")
    for landmark in ("banner", "main", "contentinfo"):
        if landmark not in roles:
            problems.append(f"no {landmark} landmark")
    return problems


def _narrow_layout_problems(page: Page) -> list[str]:
    return page.evaluate(
        """(() => {
          const out = [];
          if (document.documentElement.scrollWidth > window.innerWidth + 1)
            out.push(`scrolls sideways: ${document.documentElement.scrollWidth} > ${window.innerWidth}`);
          for (const cell of document.querySelectorAll('td')) {
            const r = cell.getBoundingClientRect();
            if (r.width > 0 && cell.textContent.trim().length > 3 && r.width < 150)
              out.push(`cell ${r.width.toFixed(0)} px wide: ${cell.textContent.trim().slice(0, 30)}`);
          }
          return out.slice(0, 10);
        })()"""
    )


def test_search_filter_and_pages_in_the_url(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path, browser: Browser
) -> None:
    ids = _fill(ledger, 130)
    port = free_port()
    config = write_config(tmp_path / "it.toml", state_dir=state_dir, outbox=outbox, port=port)
    with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
        page = browser.page
        page.goto(url + "/")
        page.wait_for("document.querySelectorAll('#browse-list tr').length === 50")
        first = page.evaluate("[...document.querySelectorAll('#browse-list tr')].map(r => r.dataset.key)")
        assert first == list(reversed(ids))[:50]
        # older pages through the link (a real URL), until the oldest job
        seen = list(first)
        for _ in range(2):
            href = page.evaluate("document.getElementById('browse-next').href")
            assert "before=" in href
            page.goto(href)
            page.wait_for(
                "document.querySelectorAll('#browse-list tr').length > 0 && document.body.dataset.ready === '1'"
            )
            page.wait_for(
                f"!{json.dumps(seen)}.includes(document.querySelector('#browse-list tr').dataset.key)"
            )
            seen += page.evaluate("[...document.querySelectorAll('#browse-list tr')].map(r => r.dataset.key)")
        assert seen == list(reversed(ids)) and page.evaluate("document.getElementById('browse-next').hidden")
        # a search and a state filter from the form land in the URL
        page.goto(url + "/")
        page.wait_for("document.querySelectorAll('#browse-list tr').length === 50")
        page.evaluate(
            "document.getElementById('q').value = 'sunny beach';"
            "document.getElementById('state').value = 'queued';"
            "document.getElementById('search').requestSubmit()"
        )
        page.wait_for("location.search.includes('q=sunny+beach') && location.search.includes('state=queued')")
        page.wait_for("document.querySelectorAll('#browse-list tr').length > 0")
        names = page.evaluate(
            "[...document.querySelectorAll('#browse-list tr')].map(r => r.children[0].textContent)"
        )
        expected = [f"clip-{i:03d}" for i in range(129, -1, -1) if i % 10 == 0 and (i + 1) % 7 != 0]
        assert names == expected
        assert page.evaluate("document.getElementById('q').value") == "sunny beach"
        assert _a11y_problems(page) == []
    assert page.errors == [], page.errors


def test_job_page_summarises_a_long_job_and_pages_its_events(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path, browser: Browser
) -> None:
    job = long_job(ledger, "ten-minute-video")
    failed = queue_job(ledger, "broken-one")
    run_job(ledger, failed.id)
    detail = {
        "traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom',
        "log_tail": ["12:00:01 INFO pipeline: chunk 1 of 3", "12:00:02 WARNING pipeline: odd frame"],
        "attempt": 1,
        "at": time.time(),
    }
    ledger.set_columns(failed.id, failure_detail=json.dumps(detail))
    fail_job(ledger, failed.id, "running", "render_error", "RuntimeError: boom")
    _fill(ledger, 30)
    port = free_port()
    config = write_config(tmp_path / "it.toml", state_dir=state_dir, outbox=outbox, port=port)
    with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
        page = browser.page
        _viewport(page, 1400)
        page.goto(f"{url}/jobs/{job.id}")
        page.wait_for("document.body.dataset.ready === '1'")
        kinds = page.evaluate(
            "[...document.querySelectorAll('#timeline tr')].map(r => r.children[2].textContent)"
        )
        assert kinds == ["created", "queued", "started"]
        assert page.evaluate("!!document.querySelector('#job-chart svg polyline')")
        points = page.evaluate(
            "document.querySelector('#job-chart polyline').getAttribute('points').split(' ').length"
        )
        assert 100 <= points <= 121
        assert "3004" in page.evaluate(text_of("#raw-link"))
        assert page.evaluate("document.documentElement.scrollHeight") < 3000
        # relative and absolute (local) times
        assert re.search(r"(ago|just now) \(\d", page.evaluate(text_of("#job-fields")))
        shot(page, tmp_path, "job-long-1400.png")
        # the raw events behind the link, 100 a page
        page.goto(page.evaluate("document.getElementById('raw-link').href"))
        page.wait_for("document.querySelectorAll('#history tr').length === 100")
        assert page.evaluate("document.querySelector('#history tr').dataset.id") == str(
            ledger.conn.execute("SELECT MIN(id) FROM events WHERE job_id = ?", (job.id,)).fetchone()[0]
        )
        page.goto(page.evaluate("document.getElementById('raw-next').href"))
        page.wait_for(
            "document.querySelectorAll('#history tr').length === 100 && !document.getElementById('raw-first').hidden"
        )
        # a failed job: its traceback and the worker's last lines, and its attempts
        page.goto(f"{url}/jobs/{failed.id}")
        page.wait_for("document.body.dataset.ready === '1' && !document.getElementById('failure').hidden")
        assert "RuntimeError: boom" in page.evaluate(text_of("#failure-traceback"))
        assert "odd frame" in page.evaluate(text_of("#failure-log"))
        assert "render_error" in page.evaluate(text_of("#attempts-list"))
        shot(page, tmp_path, "job-failed-1400.png")
        assert _a11y_problems(page) == []
        # 400 px: stacked, nothing sideways, no sliver cells
        _viewport(page, 400)
        page.goto(f"{url}/jobs/{failed.id}")
        page.wait_for("document.body.dataset.ready === '1' && !document.getElementById('failure').hidden")
        assert _narrow_layout_problems(page) == []
        shot(page, tmp_path, "job-failed-400.png")
        page.goto(url + "/")
        page.wait_for(
            "document.querySelectorAll('#browse-list tr').length > 0 && document.querySelectorAll('#problems-list tr').length > 0"
        )
        assert _narrow_layout_problems(page) == []
        shot(page, tmp_path, "main-400.png")
        _viewport(page, 1400)
        page.goto(url + "/")
        page.wait_for("document.querySelectorAll('#browse-list tr').length > 0")
        shot(page, tmp_path, "main-1400.png")
        assert _a11y_problems(page) == []
    assert page.errors == [], page.errors


def test_down_banner_after_a_real_kill_9(tmp_path: Path, browser: Browser) -> None:
    d = Daemon(tmp_path / "svc")
    staging = d.inbox / ".slow.tmp"
    make_job_bundle(staging, duration_s=1.0, seed=0, prompt="SLOW job", sample_steps=60)
    os.rename(staging, d.inbox / "slow")
    d.start()
    try:
        job = d.wait_state("slow", "running")
        port = free_port()
        config = write_config(tmp_path / "dash.toml", state_dir=d.state, outbox=d.outbox, port=port)
        with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
            page = browser.page
            page.goto(url + "/")
            card = f"#running-list [data-key='{job['id']}']"
            page.wait_for(f"/ETA/.test({text_of(card)})")
            assert page.evaluate("document.getElementById('daemon-banner').hidden") is True
            d.kill9()
            killed = time.monotonic()
            page.wait_for("!document.getElementById('daemon-banner').hidden", timeout_s=20)
            assert time.monotonic() - killed <= 15
            assert page.evaluate(text_of("#daemon-banner")).startswith("Daemon down since")
            page.wait_for(f"document.querySelector({card!r}).classList.contains('stale')")
            assert "not progressing" in page.evaluate(text_of(card))
            shot(page, tmp_path, "daemon-down-1280.png")
            page.goto(f"{url}/jobs/{job['id']}")
            page.wait_for(
                "document.body.dataset.ready === '1' && !document.getElementById('daemon-banner').hidden"
            )
            page.wait_for(f"{text_of('#job-progress-text')}.includes('the daemon is down')")
    finally:
        d.stop()
    assert page.errors == [], page.errors


def test_tiny_model_badge_real_resolution_and_banner(
    tmp_path: Path, ledger: Ledger, state_dir: Path, outbox: Path, browser: Browser
) -> None:
    from daemon import heartbeat

    job = queue_job(ledger, "tiny-render")
    run_job(ledger, job.id)
    finish_job(ledger, outbox, job.id, "tiny-render")
    (outbox / "tiny-render.json").write_text(
        json.dumps({"job_id": job.id, "width": 64, "height": 64, "fps": 25, "model": {"tiny": True}})
    )
    heartbeat.write(ledger.conn, state="ready", pid=os.getpid(), started_at=time.time(), data={"tiny": True})
    port = free_port()
    config = write_config(tmp_path / "it.toml", state_dir=state_dir, outbox=outbox, port=port)
    with dashboard_server(config, port, tmp_path / "dashboard.log") as (url, _proc):
        page = browser.page
        page.goto(url + "/")
        tile = f"#finished-list [data-key='{job.id}']"
        page.wait_for(f"!!document.querySelector({tile!r})")
        facts = page.evaluate(text_of(tile))
        assert "64×64" in facts and "tiny model" in facts and "480p" not in facts, facts
        page.wait_for("!document.getElementById('tiny-banner').hidden")
        assert page.evaluate("document.getElementById('daemon-banner').hidden") is True
        page.goto(f"{url}/jobs/{job.id}")
        page.wait_for("document.body.dataset.ready === '1'")
        assert page.evaluate(text_of("#job-tiny")) == "tiny model"
        assert "64×64 at 25 fps" in page.evaluate(text_of("#job-fields"))
    assert page.errors == [], page.errors
