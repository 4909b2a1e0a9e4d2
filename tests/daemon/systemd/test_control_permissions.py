"""Cancel requests from the upload group (issue 19) under real kernel permission checks.

In the tree `install-systemd` makes, a child process forked from this one (root only) takes an
account's uid, gid and groups and runs the project's own code: an uploader writes a cancel
request into `<inbox>/.control/` with `write_inbox_request` (the code of `cancel --inbox`), the
daemon's account answers it with `consume_inbox_requests` (its loop's code), the uploader reads
the answer; an outsider cannot ask, and the uploader cannot reach the state dir.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import commands, control
from daemon.config import Settings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _as(uid: int, gid: int, groups: tuple[int, ...], umask: int, fn: Callable[[], object]) -> int:
    """Run `fn` in a forked child under these ids; 0 if it returned, 1 if it raised (printed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def site(make_fake_root: Callable[..., Path], install_into: Callable[..., str]) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="itk-ctl-", dir="/tmp"))
    base.chmod(0o755)
    root = make_fake_root(base / "root")
    install_into(root)
    yield root
    shutil.rmtree(base)


def test_uploader_asks_the_daemon_answers_a_stranger_cannot(site: Path) -> None:
    ids = {
        f[0]: int(f[2]) for f in (line.split(":") for line in (site / "etc/group").read_text().splitlines())
    }
    users = {
        f[0]: int(f[2]) for f in (line.split(":") for line in (site / "etc/passwd").read_text().splitlines())
    }
    upload, service = ids["infinitetalk-upload"], ids["infinitetalk"]
    inbox, state = site / "srv/infinitetalk/inbox", site / "var/lib/infinitetalk"
    control_dir = inbox / ".control"
    st = control_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2770 and st.st_gid == upload
    settings = replace(Settings(), inbox=inbox, state_dir=state)

    def uploader_asks() -> None:
        control.write_inbox_request(settings, "alice")

    assert _as(54321, 54321, (upload,), 0o077, uploader_asks) == 0  # even a strict umask
    (request,) = control_dir.glob("*.json")
    assert request.stat().st_uid == 54321 and request.stat().st_gid == upload
    answer_path = request.with_name(request.name[: -len(".json")] + control.INBOX_ANSWER_SUFFIX)
    seen: list[tuple[str, str]] = []

    def apply(action: str, ref: str) -> control.Outcome:
        seen.append((action, ref))
        return control.Outcome(ok=True, message=f"{ref}: cancelled")

    def daemon_answers() -> None:
        assert control.consume_inbox_requests(settings, apply) == 1
        assert seen == [("inbox-cancel", "alice")]  # the restricted cancel, never a plain one

    assert _as(users["infinitetalk"], service, (upload,), 0o027, daemon_answers) == 0
    assert answer_path.exists() and answer_path.stat().st_gid == upload

    def uploader_reads() -> None:
        got = commands._wait_answer(answer_path, 5.0)
        assert got is not None and got["ok"] and got["message"] == "alice: cancelled"
        assert not answer_path.exists()
        # the state dir stays closed to it: cancel goes through the inbox, retry/delete refused
        assert commands._state_dir_closed(state)
        assert commands._ledger_closed(state / "ledger.sqlite3") is not None

    assert _as(54321, 54321, (upload,), 0o007, uploader_reads) == 0

    def stranger_asks() -> None:
        try:
            control.write_inbox_request(settings, "alice")
        except PermissionError:
            return
        raise AssertionError("a user outside the upload group wrote a request")

    assert _as(54322, 54322, (), 0o022, stranger_asks) == 0
