"""Uploads by real clients into a running daemon's inbox: rsync over SSH, sftp, scp, cp.

The recipes are read from docs/uploading.md and run verbatim through bash, against an OpenSSH
server on 127.0.0.1 (the session fixture `sshd`). Wrappers first on PATH add only what the doc
leaves to the user's setup: the SSH config (port, key, no host-key prompts) and, for the
interrupted runs, a bandwidth limit so the SIGKILL lands in the middle of the largest file.

Each recipe runs with and without checksums in job.json:
1. killed halfway through the big WAV: the job must not be admitted (it waits, or without
   checksums an in-place writer's truncated file is rejected as bad media);
2. run again to the end: the job is admitted exactly once and rendered once.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon.reliability import harness
from tests.daemon.reliability.harness import SshServer
from tests.helpers.daemon import FINAL, Daemon
from tests.helpers.proc import ROOT, wait_until

DOC = ROOT / "docs" / "uploading.md"
#: recipes that write final names in place: without checksums a killed run may be rejected
IN_PLACE = {"rsync-partial", "rsync-inplace", "sftp-inplace", "scp", "cp-inplace"}
BIG_AUDIO_S = 8.0  # a 44.1 kHz stereo WAV of 1.4 MB: the file that is cut
HOST_ALIAS = "inboxhost"
_seeds = itertools.count(100)


def doc_recipes() -> dict[str, str]:
    """`<!-- recipe: NAME -->` followed by a ```sh block, from docs/uploading.md."""
    text = DOC.read_text()
    found = re.findall(r"<!-- recipe: ([\w-]+) -->\s*```sh\n(.*?)```", text, flags=re.DOTALL)
    return {name: body for name, body in found}


RECIPES = doc_recipes()


def test_doc_lists_every_tested_transport() -> None:
    """The doc's recipes are exactly the transports this file exercises."""
    assert set(RECIPES) == {
        "rsync-staged",
        "sftp-staged",
        "cp-staged",
        "rsync-bundle",
        "rsync-media-first",
        *IN_PLACE,
    }
    for name in IN_PLACE:  # the in-place ones are documented under "only with checksums"
        section = DOC.read_text().split("### Safe only with checksums")[1].split("### Pitfalls")[0]
        assert f"recipe: {name} " in section


@pytest.fixture(scope="module")
def client_env(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH wrappers: ssh/sftp/scp read an ssh config for HOST_ALIAS; THROTTLE=1 slows each tool."""
    folder = tmp_path_factory.mktemp("clients")
    config = folder / "ssh_config"
    config.write_text(
        "\n".join(
            [
                f"Host {HOST_ALIAS}",
                "  HostName 127.0.0.1",
                f"  Port {sshd.port}",
                f"  User {sshd.user}",
                f"  IdentityFile {sshd.key}",
                "  StrictHostKeyChecking no",
                "  UserKnownHostsFile /dev/null",
                "  BatchMode yes",
                "  LogLevel ERROR",
                "",
            ]
        )
    )
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    strace = shutil.which("strace") or ""
    wrappers = {
        "ssh": f'exec /usr/bin/ssh -F {config} "$@"',
        # sftp -l / scp -l: Kbit/s; rsync --bwlimit: KiB/s (about 400 KB/s each: 1.4 MB in ~3.5 s)
        "sftp": f'exec /usr/bin/sftp -F {config} ${{THROTTLE:+-l 3200}} "$@"',
        "scp": f'exec /usr/bin/scp -F {config} ${{THROTTLE:+-l 3200}} "$@"',
        "rsync": 'exec /usr/bin/rsync ${THROTTLE:+--bwlimit=400} "$@"',
        # cp copies with copy_file_range in one go; under THROTTLE strace refuses that call (cp
        # falls back to read/write) and delays each 128 KiB write by 0.25 s
        "cp": (
            'if [ -n "$THROTTLE" ]; then exec ' + strace + " -f -qq -o /dev/null "
            "-e trace=copy_file_range,write -e inject=copy_file_range:error=ENOSYS "
            '-e inject=write:delay_exit=250000 /usr/bin/cp "$@"; fi; exec /usr/bin/cp "$@"'
        ),
    }
    for name, body in wrappers.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOST": HOST_ALIAS}


@pytest.fixture(scope="module")
def daemon(daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    d = daemon_factory("uploads", max_running=2)
    d.start()
    return d


def run_recipe(
    recipe: str, env: dict[str, str], *, job: Path, name: str, inbox: Path, interrupt: bool
) -> None:
    script = RECIPES[recipe]
    full_env = {**os.environ, **env, "JOB": str(job), "NAME": name, "INBOX": str(inbox)}
    harness.RECIPES_RUN.setdefault(recipe, [script.strip()])
    harness.count("uploads tried")
    if not interrupt:
        result = subprocess.run(
            ["bash", "-c", "set -e\n" + script], env=full_env, capture_output=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"{recipe} failed: {result.stderr.decode(errors='replace')}"
        return
    if recipe.startswith("cp-") and not shutil.which("strace"):
        pytest.skip("strace is needed to slow cp down enough to kill it mid-file")
    big = (job / "voice.WAV").stat().st_size
    folders = [inbox / name, inbox / f".{name}.uploading", inbox / f".{name}.copying"]
    harness.run_interrupted(
        ["bash", "-c", "set -e\n" + script],
        harness.partial_file_in(folders, big),
        env={**full_env, "THROTTLE": "1"},
    )
    harness.count("uploads interrupted")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_upload_interrupted_then_completed(
    recipe: str, checksums: bool, daemon: Daemon, client_env: dict[str, str], tmp_path: Path
) -> None:
    name = f"{recipe}-{'sum' if checksums else 'nosum'}"
    job = harness.make_bundle(tmp_path / "job42", seed=next(_seeds), audio_s=BIG_AUDIO_S, checksums=checksums)

    # 1. killed mid-file: never admitted
    run_recipe(recipe, client_env, job=job, name=name, inbox=daemon.inbox, interrupt=True)
    time.sleep(daemon_settle_window())
    if recipe in IN_PLACE and not checksums:
        # judged once quiet: a truncated media file is rejected naming it; a bundle whose job.json
        # had not arrived yet (cp copies in directory order) keeps waiting for it
        def judged() -> tuple[list[dict], ...]:
            rows = daemon.jobs(name)
            ok = all(
                r["state"] == "rejected"
                or (r["state"] == "waiting" and "incomplete upload" in (r["waiting_reason"] or ""))
                for r in rows
            )
            return (rows,) if ok else ()

        (rows,) = wait_until(judged, 30, f"the daemon to judge the cut upload {name}")
        for row in rows:
            if row["state"] == "rejected":
                assert row["error_code"] == "bad_media", row
                assert "voice.WAV" in (row["error_message"] or ""), row
    else:
        for row in daemon.jobs(name):
            assert row["state"] == "waiting", row
    assert daemon.admitted(name) == [], f"a partial upload was admitted: {daemon.jobs(name)}"

    # 2. the same command again, to the end: admitted exactly once, rendered once
    judged = [r["id"] for r in daemon.jobs(name) if r["state"] in FINAL]
    run_recipe(recipe, client_env, job=job, name=name, inbox=daemon.inbox, interrupt=False)
    row = daemon.wait_state(name, ["queued", "running", "done"], timeout_s=30, ignore=judged)
    assert row["input_hashes_json"], row
    time.sleep(daemon_settle_window())
    admitted = daemon.admitted(name)
    assert [r["id"] for r in admitted] == [row["id"]], daemon.jobs(name)
    assert not (daemon.inbox / name).exists()
    daemon.assert_alive()


def daemon_settle_window() -> float:
    """Long enough for the daemon (settle_s 1 s, rescans every 0.5 s while a job waits) to judge."""
    return 2.5


@pytest.mark.timeout(300)
def test_every_upload_rendered_exactly_once(daemon: Daemon) -> None:
    """After all the uploads above: every admitted job is done once, the outbox has one video per
    job, and the ledger and the folders agree."""
    daemon.wait_idle(timeout_s=240)
    counts = harness.check_invariants(daemon)
    names = {r["name"] for r in daemon.jobs()}
    for name in names:
        done = [r for r in daemon.jobs(name) if r["state"] == "done"]
        assert len(done) <= 1, (name, done)
    assert counts.get("failed", 0) == 0, daemon.jobs()
    assert counts.get("queued", 0) == counts.get("running", 0) == 0
    tally = harness.tally(daemon)
    assert tally["lost"] == tally["duplicates"] == 0, tally
    daemon.assert_alive()


def test_doc_checksum_snippet_writes_the_right_hashes(tmp_path: Path) -> None:
    """The "Adding checksums" snippet of docs/uploading.md, run as written, hashes every media file."""
    snippet = re.search(r"## Adding checksums\s*```sh\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert snippet is not None
    job = harness.make_bundle(tmp_path / "job42", seed=next(_seeds), checksums=False)
    result = subprocess.run(
        ["bash", "-c", "set -e\n" + snippet.group(1)],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    doc = json.loads((job / "job.json").read_text())
    assert doc["checksums"] == {name: harness.sha256(job / name) for name in ("face.png", "voice.WAV")}
