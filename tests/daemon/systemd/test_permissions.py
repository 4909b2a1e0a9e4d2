"""The folder design of install-systemd under real kernel permission checks.

Processes run with the uids and gids the installation created (`setpriv`, so root only): an
uploader in the upload group, the daemon, the dashboard and a stranger. They do what the real
programs do: upload a bundle, claim it by renaming it into the state dir, publish to the outbox,
write the WAL ledger, read it read-only, fetch results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="switching users needs root and setpriv"
)
PYTHON = "/usr/bin/python3"


@dataclass(frozen=True, slots=True)
class Account:
    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int

    def run(self, code: str) -> subprocess.CompletedProcess[str]:
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        script = f"import os, sqlite3, pathlib\nos.umask(0o{self.umask:03o})\n" + textwrap.dedent(code)
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *groups, PYTHON, "-c", script],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, code: str) -> str:
        result = self.run(code)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def denied(self, code: str) -> None:
        result = self.run(code)
        assert result.returncode != 0 and "PermissionError" in result.stderr + result.stdout, result


@pytest.fixture
def site(make_fake_root: Callable[..., Path], install_into: Callable[..., str]) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="itk-perm-", dir="/tmp"))
    base.chmod(0o755)  # traversable by the service users, like /
    root = make_fake_root(base / "root")
    install_into(root)
    yield root
    shutil.rmtree(base)


def _ids(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    users = {
        f[0]: int(f[2]) for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())
    }
    groups = {
        f[0]: int(f[2]) for f in (line.split(":") for line in (root / "etc/group").read_text().splitlines())
    }
    return users, groups


def test_upload_claim_publish_and_read(site: Path) -> None:
    users, groups = _ids(site)
    upload, service = groups["infinitetalk-upload"], groups["infinitetalk"]
    # as the units run them (User=, Group=, SupplementaryGroups=, UMask=)
    daemon = Account(users["infinitetalk"], service, (upload,), 0o027)
    web = Account(users["infinitetalk-web"], service, (upload,), 0o077)
    # an SFTP account with ForceCommand internal-sftp -u 0007, and someone outside the groups
    uploader = Account(54321, 54321, (upload,), 0o007)
    stranger = Account(54322, 54322, (), 0o022)
    inbox, outbox = site / "srv/infinitetalk/inbox", site / "srv/infinitetalk/outbox"
    state, weights = site / "var/lib/infinitetalk", site / "srv/infinitetalk/weights"

    uploader.ok(f"""
        job = pathlib.Path("{inbox}/alice")
        job.mkdir()
        (job / "job.json").write_text("{{}}")
        (job / "voice.wav").write_bytes(b"RIFF")
    """)
    assert (inbox / "alice/voice.wav").stat().st_gid == upload  # setgid inbox
    stranger.denied(f"pathlib.Path('{inbox}/mallory.json').write_text('x')")

    # the daemon claims the bundle by renaming it into its state dir, then reads it
    daemon.ok(f"""
        jobs = pathlib.Path("{state}/jobs/j1")
        jobs.mkdir(parents=True)
        os.rename("{inbox}/alice", jobs / "input")
        assert (jobs / "input/voice.wav").read_bytes() == b"RIFF"
    """)
    # the WAL ledger stays open while the dashboard reads it read-only
    daemon_and_dashboard = f"""
        import subprocess, sys
        db = sqlite3.connect("{state}/ledger.sqlite3")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE jobs (id TEXT)")
        db.execute("INSERT INTO jobs VALUES ('j1')")
        db.commit()
        pathlib.Path("{outbox}/.partial").mkdir()
        pathlib.Path("{outbox}/.partial/alice.mp4").write_bytes(b"mp4")
        os.rename("{outbox}/.partial/alice.mp4", "{outbox}/alice.mp4")
        print("ready", flush=True)
        sys.stdin.readline()
    """
    holder = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={daemon.uid}",
            f"--regid={daemon.gid}",
            f"--groups={upload}",
            PYTHON,
            "-c",
            "import os, sqlite3, pathlib\nos.umask(0o027)\n" + textwrap.dedent(daemon_and_dashboard),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready", holder.stderr
        read_ledger = f"""
            db = sqlite3.connect("file:{state}/ledger.sqlite3?mode=ro", uri=True)
            db.execute("PRAGMA query_only=1")
            print(db.execute("SELECT id FROM jobs").fetchall())
        """
        assert web.ok(read_ledger).strip() == "[('j1',)]"
        web.denied(f"open('{state}/ledger.sqlite3', 'r+b')")
        stranger.denied(f"os.listdir('{state}')")
        # results: readable by uploaders and the dashboard, by nobody else
        assert uploader.ok(f"print(open('{outbox}/alice.mp4').read())").strip() == "mp4"
        assert web.ok(f"print(open('{outbox}/alice.mp4').read())").strip() == "mp4"
        stranger.denied(f"open('{outbox}/alice.mp4').read()")
        uploader.denied(f"open('{outbox}/bob.mp4', 'w')")
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0, holder.stderr

    # weights: root puts them there, the daemon reads but cannot change them
    (weights / "model.safetensors").write_bytes(b"w")
    (weights / "model.safetensors").chmod(0o644)
    assert daemon.ok(f"print(open('{weights}/model.safetensors').read())").strip() == "w"
    daemon.denied(f"open('{weights}/extra', 'w')")
    stranger.denied(f"os.listdir('{weights}')")


def test_uploads_without_group_write_cannot_be_claimed(site: Path) -> None:
    """Why SFTP accounts need `-u 0007` and rsync `--chmod=ug+rwX`: the daemon renames the bundle,
    which needs write permission on the bundle folder itself."""
    users, groups = _ids(site)
    upload, service = groups["infinitetalk-upload"], groups["infinitetalk"]
    daemon = Account(users["infinitetalk"], service, (upload,), 0o027)
    careless = Account(54323, 54323, (upload,), 0o022)
    inbox, state = site / "srv/infinitetalk/inbox", site / "var/lib/infinitetalk"
    careless.ok(
        f"pathlib.Path('{inbox}/bob').mkdir(); pathlib.Path('{inbox}/bob/job.json').write_text('{{}}')"
    )
    daemon.ok(f"print(open('{inbox}/bob/job.json').read())")  # readable: the job is seen...
    daemon.denied(f"os.makedirs('{state}/jobs/j2'); os.rename('{inbox}/bob', '{state}/jobs/j2/input')")
