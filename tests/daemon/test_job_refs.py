"""daemon/job_refs.py on a real SQLite ledger: ids, names and id prefixes for cancel/retry/delete."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.job_refs import JobRefError, resolve
from daemon.ledger import Ledger


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite3")


def _job(ledger: Ledger, job_id: str, name: str, state: str) -> str:
    row = ledger.insert_job(id=job_id, name=name, source=f"/in/{name}", state="waiting")
    if state != "waiting":
        ledger.transition(row.id, "waiting", state)
    return row.id


def test_full_id_exact(ledger: Ledger) -> None:
    _job(ledger, "aaaa11112222", "anna", "waiting")
    found = resolve(ledger.conn, "aaaa11112222", action="delete")
    assert found.job.id == "aaaa11112222" and found.how == "id"


def test_unique_prefix_and_ambiguous_prefix_lists_candidates(ledger: Ledger) -> None:
    _job(ledger, "abcd00000001", "one", "waiting")
    _job(ledger, "abcd00000002", "two", "waiting")
    _job(ledger, "ffff00000003", "three", "waiting")
    assert resolve(ledger.conn, "ffff", action="cancel").job.id == "ffff00000003"
    assert resolve(ledger.conn, "ABCD00000002", action="cancel").job.id == "abcd00000002"  # case-insensitive
    with pytest.raises(JobRefError) as e:
        resolve(ledger.conn, "abcd", action="cancel")
    assert {j.id for j in e.value.candidates} == {"abcd00000001", "abcd00000002"}
    assert "ambiguous" in e.value.message and "abcd00000001 (one, waiting)" in e.value.message
    with pytest.raises(JobRefError, match="at least 4"):
        resolve(ledger.conn, "ff", action="cancel")  # too short to be a prefix


def test_name_cancel_takes_newest_active_and_delete_newest(ledger: Ledger) -> None:
    _job(ledger, "100000000001", "anna", "waiting")
    _job(ledger, "200000000002", "anna", "waiting")
    _job(ledger, "300000000003", "anna", "cancelled")  # newest, but no longer active
    found = resolve(ledger.conn, "anna", action="cancel")
    assert found.job.id == "200000000002" and found.how == "name"
    assert "anna" in found.describe("anna") and "200000000002" in found.describe("anna")
    assert resolve(ledger.conn, "anna", action="delete").job.id == "300000000003"
    assert resolve(ledger.conn, "anna", action="retry").job.id == "300000000003"


def test_name_with_no_active_job_says_so(ledger: Ledger) -> None:
    _job(ledger, "400000000004", "bob", "cancelled")
    with pytest.raises(JobRefError, match=r"no job named 'bob' is .*newest job is 400000000004"):
        resolve(ledger.conn, "bob", action="cancel")


def test_name_that_is_also_another_jobs_id_prefix_is_ambiguous(ledger: Ledger) -> None:
    _job(ledger, "beef00000001", "x", "waiting")
    _job(ledger, "500000000005", "beef", "waiting")
    with pytest.raises(JobRefError) as e:
        resolve(ledger.conn, "beef", action="cancel")
    assert {j.id for j in e.value.candidates} == {"beef00000001", "500000000005"}


def test_unknown_and_hostile_refs(ledger: Ledger) -> None:
    _job(ledger, "600000000006", "c", "waiting")
    for ref in ("", "   ", "nosuchjob", "x" * 1000, "a\x00b", "%", "6000%"):
        with pytest.raises(JobRefError):
            resolve(ledger.conn, ref, action="delete")
