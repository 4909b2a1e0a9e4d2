"""`infinitetalk submit | status | cancel | retry | delete`: the queue from the command line.

- `submit JOB.json|DIR` copies a job into the inbox safely: everything is staged under a
  dot-name the daemon ignores, then renamed into place in one step.
- `status [--json] [--state S] [--name TEXT] [--limit N] [--check]` reads the ledger read-only
  (daemon/status_cmd.py).
- `cancel`, `retry`, `delete` hand a request to the running daemon (the ledger's only writer)
  and print its answer; with no daemon running they apply it themselves under the same lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

EX_CONFIG = 78


def register(subparsers: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None, help="TOML config file")

    p = subparsers.add_parser(
        "submit", help="copy a job (JOB.json with its media, or a bundle DIR) into the inbox"
    )
    p.add_argument("job", type=Path, help="a job JSON (its media beside it) or a bundle directory")
    p.add_argument("--name", default=None, help="name in the inbox (default: the file or folder name)")
    common(p)
    p.set_defaults(func=run_submit)

    p = subparsers.add_parser("status", help="daemon liveness, queue and the newest jobs from the ledger")
    p.add_argument("--json", action="store_true", help="print one JSON object {counts, daemon, jobs, ...}")
    from daemon.status_cmd import add_arguments  # standard library only

    add_arguments(p)
    common(p)
    p.set_defaults(func=run_status)

    for action, text in (
        ("cancel", "cancel a waiting, queued or running job"),
        ("retry", "queue a failed or cancelled job again"),
        ("delete", "remove a job's outputs (its ledger history is kept)"),
    ):
        p = subparsers.add_parser(action, help=text)
        p.add_argument("job_id")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon's answer")
        common(p)
        p.set_defaults(func=run_request, action=action)


def _settings(args: argparse.Namespace) -> Any:
    from daemon.config import ConfigError, load_settings

    try:
        return load_settings(args.config)
    except ConfigError as e:
        print(f"infinitetalk: bad config: {e}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from e


# ---------------------------------------------------------------------- submit


def _job_media(doc: Any) -> list[str]:
    from daemon.jobs import SILENT

    names: list[str] = []
    if isinstance(doc, dict):
        if isinstance(doc.get("cond_video"), str):
            names.append(doc["cond_video"])
        audio = doc.get("cond_audio")
        if isinstance(audio, dict):
            names += [v for v in audio.values() if isinstance(v, str) and v != SILENT]
    return names


def submit(source: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy a job into `inbox` as a bundle `<name>/` (staged as `.<name>.submitting`, then renamed).

    The job is checked first, as the daemon will check it (`daemon.jobs.load_job`: JSON, fields,
    media paths that stay inside the job's folder, media present): a bad job raises
    `InvalidJob` (a ValueError) naming every problem, and nothing is written to the inbox."""
    from daemon.jobs import load_job

    source = source.resolve()
    inbox.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        if not (source / "job.json").is_file():
            raise ValueError(f"{source} is a folder without job.json")
        base = name or source.name
        load_job(source / "job.json")
    elif source.is_file():
        base = name or source.stem
        load_job(source)
    else:
        raise FileNotFoundError(f"{source} does not exist")
    final = _free_name(inbox, base)
    staging = inbox / f".{final.name}.submitting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if source.is_dir():
            shutil.copytree(source, staging, symlinks=True)
        else:
            raw = source.read_bytes()
            doc = json.loads(raw.decode("utf-8-sig"))
            staging.mkdir()
            (staging / "job.json").write_bytes(raw)
            for rel in _job_media(doc):  # checked by load_job: inside source.parent, present
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.parent / rel, target)
        for root, _dirs, files in os.walk(staging):
            # group read/write so the daemon (in the inbox's upload group) can claim the bundle by
            # renaming it: moving a folder needs write permission on the folder itself
            os.chmod(root, os.stat(root).st_mode | 0o070)
            for f in files:
                path = os.path.join(root, f)
                if os.path.islink(path):
                    continue  # kept as a link: the daemon rejects it with a clear error
                os.chmod(path, os.stat(path).st_mode | 0o060)
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _free_name(inbox: Path, base: str) -> Path:
    candidate = inbox / base
    n = 2
    while candidate.exists() or (inbox / f"{candidate.name}.json").exists():
        candidate = inbox / f"{base}-{n}"
        n += 1
    return candidate


def run_submit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        final = submit(args.job, settings.inbox, args.name)
    except (OSError, ValueError) as e:
        print(f"infinitetalk submit: {e}", file=sys.stderr)
        return 1
    print(f"submitted {final}")
    return 0


# ---------------------------------------------------------------------- status


def run_status(args: argparse.Namespace) -> int:
    """The summary line and the newest jobs (daemon/status_cmd.py)."""
    settings = _settings(args)
    claimed = list(settings.jobs_dir.iterdir()) if settings.jobs_dir.is_dir() else []
    if claimed and not settings.ledger_path.exists():  # zeros here would be a lie
        print(
            f"infinitetalk status: the ledger {settings.ledger_path} is missing but {settings.jobs_dir} "
            f"holds {len(claimed)} claimed job(s); see {settings.state_dir}/ledger.sqlite3.rescued-*",
            file=sys.stderr,
        )
    from daemon import status_cmd

    return status_cmd.run(args, settings.ledger_path)


# ---------------------------------------------------------------------- cancel / retry / delete


def run_request(args: argparse.Namespace) -> int:
    from daemon import control
    from daemon.supervisor import acquire_lock, lock_is_held

    settings = _settings(args)
    if lock_is_held(settings.state_dir):
        answer_path = control.write_request(settings, args.action, args.job_id)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if answer_path.exists():
                answer = json.loads(answer_path.read_text())
                answer_path.unlink(missing_ok=True)
                print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
                return 0 if answer["ok"] else 1
            time.sleep(0.1)
        print(
            f"the daemon did not answer within {args.timeout:g} s; the request stays queued in "
            f"{settings.requests_dir}",
            file=sys.stderr,
        )
        return 1
    from daemon.errors import DaemonLocked, FolderUnusable
    from daemon.ledger import Ledger
    from daemon.outbox import Outbox

    if not settings.ledger_path.exists():
        print(f"no ledger at {settings.ledger_path}: no job has been seen yet", file=sys.stderr)
        return 1
    try:
        fd = acquire_lock(settings.state_dir)
    except (DaemonLocked, FolderUnusable) as e:  # a daemon started meanwhile, or a read-only state dir
        print(str(e), file=sys.stderr)
        return 1
    try:
        ledger = Ledger(settings.ledger_path)
        outcome = control.apply_request(settings, ledger, Outbox(settings.outbox), args.action, args.job_id)
        ledger.close()
    finally:
        os.close(fd)
    print(outcome.message, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else 1
