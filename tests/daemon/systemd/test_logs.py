"""daemon.logs: journald priority prefixes under systemd, human lines elsewhere, job tags."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from daemon.logs import configure_logging, job_context, log_state_change, parse_level, sd_priority

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "stderr.log", "w+", encoding="utf-8") as stream:
        yield stream
    logging.getLogger().handlers.clear()


def _journal_env(stream: TextIO) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def _lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journal_lines_carry_priorities_and_no_timestamp(log_file: TextIO) -> None:
    configure_logging("debug", stream=log_file, environ=_journal_env(log_file))
    log = logging.getLogger("daemon.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert _lines(log_file) == [
        "<7>daemon.test: d",
        "<6>daemon.test: i",
        "<4>daemon.test: w",
        "<3>daemon.test: e",
    ]


def test_traceback_lines_keep_the_priority(log_file: TextIO) -> None:
    configure_logging("info", stream=log_file, environ=_journal_env(log_file))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("daemon.worker").exception("render failed")
    lines = _lines(log_file)
    assert lines[0] == "<3>daemon.worker: render failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


def test_journal_stream_of_another_file_means_human_format(log_file: TextIO, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    configure_logging("info", stream=log_file, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    logging.getLogger("daemon.x").info("hello")
    (line,) = _lines(log_file)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO    daemon\.x: hello", line), line


def test_level_filters_and_job_context_tags(log_file: TextIO) -> None:
    configure_logging("warning", stream=log_file, environ={})
    log = logging.getLogger("daemon.worker")
    log.info("hidden")
    with job_context("3f9a"):
        log.warning("slow step")
    log.warning("outside")
    lines = _lines(log_file)
    assert len(lines) == 2
    assert lines[0].endswith("WARNING daemon.worker [job 3f9a]: slow step")
    assert lines[1].endswith("WARNING daemon.worker: outside")


def test_state_change_lines(log_file: TextIO) -> None:
    configure_logging("info", stream=log_file, environ=_journal_env(log_file))
    log = logging.getLogger("daemon.ledger")
    with job_context("ab12"):
        log_state_change(log, "ab12", "alice", "queued", "running", "attempt 1")
    log_state_change(log, "ab12", "alice", "running", "failed", "E_DECODE: voice.wav is not audio")
    log_state_change(log, "cd34", "bob", None, "rejected", "unknown key 'sise'")
    assert _lines(log_file) == [
        '<6>daemon.ledger: job ab12 "alice" queued -> running: attempt 1',
        '<3>daemon.ledger: job ab12 "alice" running -> failed: E_DECODE: voice.wav is not audio',
        "<4>daemon.ledger: job cd34 \"bob\" rejected: unknown key 'sise'",
    ]


def test_process_tag(log_file: TextIO) -> None:
    configure_logging("info", stream=log_file, environ=_journal_env(log_file), tag="worker")
    with job_context("ab12"):
        logging.getLogger("daemon.runner").info("chunk 1/3 done")
    assert _lines(log_file) == ["<6>worker daemon.runner [job ab12]: chunk 1/3 done"]


def test_reconfigure_replaces_the_handler(log_file: TextIO) -> None:
    configure_logging("info", stream=log_file, environ={})
    configure_logging("info", stream=log_file, environ={})
    logging.getLogger("x").info("once")
    assert len(_lines(log_file)) == 1


def test_levels() -> None:
    assert parse_level("INFO") == logging.INFO and parse_level(" debug ") == logging.DEBUG
    assert parse_level(25) == 25
    with pytest.raises(ValueError, match="'loud'"):
        parse_level("loud")
    assert [sd_priority(n) for n in (50, 40, 30, 25, 20, 10, 5)] == [2, 3, 4, 6, 6, 7, 7]


def test_real_stderr_of_a_child_process(tmp_path: Path) -> None:
    """The same check journald makes: a child whose stderr is the file JOURNAL_STREAM names."""
    target = tmp_path / "journal"
    code = (
        "import logging, os, sys; from daemon.logs import configure_logging;"
        "st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}';"
        "configure_logging('info'); logging.getLogger('daemon.service').warning('queue full')"
    )
    with open(target, "wb") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, cwd=ROOT)
    assert target.read_text() == "<4>daemon.service: queue full\n"
