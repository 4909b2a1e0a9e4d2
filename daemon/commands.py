"""`infinitetalk submit | status | cancel | retry | delete`: the queue from the command line.

- `submit JOB.json|DIR [--wait]` copies a job into the inbox safely: everything is staged under a
  dot-name the daemon ignores, then renamed into place in one step; it prints the job's name, and
  with `--wait` follows the job in the ledger to its end and prints the output video's path
  (exit 0 done, 1 failed, rejected or cancelled, printing the error code and message).
- `status [--json] [--state S] [--name TEXT] [--limit N] [--check]` reads the ledger read-only
  (daemon/status_cmd.py).
- `cancel`, `retry`, `delete JOB` hand a request to the running daemon (the ledger's only writer)
  and print its answer; with no daemon running they apply it themselves under the same lock. JOB
  is an id, a unique id prefix or a job name (daemon/job_refs.py). `cancel --inbox` (automatic
  for a user who may not enter the state dir) asks through `<inbox>/.control/` instead.
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

from daemon import states

EX_CONFIG = 78


def register(subparsers: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None, help="TOML config file")

    p = subparsers.add_parser(
        "submit", help="copy a job (JOB.json with its media, or a bundle DIR) into the inbox"
    )
    p.add_argument("job", type=Path, help="a job JSON (its media beside it) or a bundle directory")
    p.add_argument("--name", default=None, help="name in the inbox (default: the file or folder name)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its end; print the output video's path (exit 0 done, 1 otherwise)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="with --wait: give up after this many seconds (exit 1)"
    )
    common(p)
    p.set_defaults(func=run_submit)

    p = subparsers.add_parser("status", help="daemon liveness, queue and the newest jobs from the ledger")
    p.add_argument("--json", action="store_true", help="print one JSON object {counts, daemon, jobs, ...}")
    from daemon.status_cmd import add_arguments  # standard library only

    add_arguments(p)
    common(p)
    p.set_defaults(func=run_status)

    for action, text, by_name in (
        ("cancel", "cancel a waiting, queued or running job", "the newest active job of that name"),
        (
            "retry",
            "queue a failed or cancelled job again; a done job renders again as a new linked job",
            "the newest job of that name",
        ),
        ("delete", "remove a job's outputs (its ledger history is kept)", "the newest job of that name"),
    ):
        p = subparsers.add_parser(action, help=text)
        p.add_argument(
            "job_id",
            metavar="JOB",
            help=f"a job id, a unique id prefix (4+ characters) or a name ({by_name})",
        )
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon's answer")
        if action == "cancel":
            p.add_argument(
                "--inbox",
                action="store_true",
                help="ask through <inbox>/.control/ (upload-group users; waiting or queued jobs only; "
                "the default when the state dir is not writable)",
            )
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
    closed = _ledger_closed(settings.ledger_path) if args.wait else None
    if closed:
        print(
            f"infinitetalk submit --wait: cannot read the ledger {settings.ledger_path} ({closed}); "
            "--wait needs read access to the state dir. Nothing was submitted; without --wait the "
            "result appears in the outbox",
            file=sys.stderr,
        )
        return 1
    after = _newest_seq(settings.ledger_path) if args.wait else 0
    try:
        final = submit(args.job, settings.inbox, args.name)
    except (OSError, ValueError) as e:
        print(f"infinitetalk submit: {e}", file=sys.stderr)
        return 1
    from daemon.inbox import output_name

    print(f"submitted job {output_name(final.name)} as {final}", flush=True)
    if not args.wait:
        return 0
    return follow(settings.ledger_path, final, after=after, timeout_s=args.timeout)


FINAL = tuple(s.value for s in states.FINAL)


def _ledger_closed(ledger_path: Path) -> str | None:
    """Why this user cannot read the ledger (None: it can, or it is not made yet)."""
    try:
        if ledger_path.exists():
            return None if os.access(ledger_path, os.R_OK) else "permission denied"
        folder = ledger_path.parent
        if folder.exists() and not os.access(folder, os.R_OK | os.X_OK):
            return "permission denied"
    except OSError as e:
        return e.strerror or str(e)
    return None


def _newest_seq(ledger_path: Path) -> int:
    import sqlite3

    from daemon.ledger import connect

    if not ledger_path.exists():
        return 0
    try:
        conn = connect(ledger_path, readonly=True)
        try:
            return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def _job_for_source(ledger_path: Path, source: str, after: int) -> Any:
    import sqlite3

    from daemon.ledger import JobRow, connect

    if not ledger_path.exists():
        return None
    try:
        conn = connect(ledger_path, readonly=True, timeout_s=5.0)
    except sqlite3.OperationalError:
        return None  # being created
    try:
        row = conn.execute(
            "SELECT * FROM jobs WHERE source = ? AND seq > ? ORDER BY seq DESC LIMIT 1", (source, after)
        ).fetchone()
    except sqlite3.OperationalError:  # the schema is being made
        return None
    finally:
        conn.close()
    return JobRow.from_row(row) if row else None


def follow(
    ledger_path: Path, entry: Path, *, after: int, timeout_s: float | None, poll_s: float = 0.2
) -> int:
    """`submit --wait`: follow the job the daemon makes of the inbox entry `entry` (the newest
    job of that source seen after ledger row `after`) to a final state; print each state it
    reaches (stderr) and at the end the output video's path (stdout). 0 done, 1 otherwise."""
    from daemon.inbox import storable

    source = storable(str(entry))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = None
    while deadline is None or time.monotonic() < deadline:
        try:
            job = _job_for_source(ledger_path, source, after)
        except OSError as e:  # e.g. no permission to read the state dir
            print(f"infinitetalk submit --wait: cannot read the ledger {ledger_path}: {e}", file=sys.stderr)
            return 1
        if job is not None and job.state != shown:
            shown = job.state
            print(f"job {job.id} ({job.name}): {job.state}", file=sys.stderr, flush=True)
        if job is not None and job.state in FINAL:
            if job.state == "done":
                print(job.output_video, flush=True)
                return 0
            print(
                f"job {job.id} ({job.name}) {job.state}: {job.error_code}: {job.error_message}"
                + (f" (see {job.output_json})" if job.output_json else ""),
                file=sys.stderr,
            )
            return 1
        time.sleep(poll_s)
    print(
        f"infinitetalk submit --wait: still {shown or 'not seen by the daemon'} after {timeout_s:g} s",
        file=sys.stderr,
    )
    return 1


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


def _print_answer(answer: dict[str, Any]) -> int:
    print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
    for candidate in answer.get("candidates") or ():
        print(f"  {candidate}", file=sys.stderr)
    return 0 if answer["ok"] else 1


def _wait_answer(answer_path: Path, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answer_path.exists():
            answer: dict[str, Any] = json.loads(answer_path.read_text())
            answer_path.unlink(missing_ok=True)
            return answer
        time.sleep(0.1)
    return None


def _state_dir_closed(state_dir: Path) -> bool:
    """True when this user may not use the state dir (an uploader, not the daemon's user)."""
    return state_dir.exists() and not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK)


def run_inbox_cancel(settings: Any, ref: str, timeout_s: float) -> int:
    from daemon import control

    if not settings.inbox_cancel_requests:
        print("inbox cancel requests are off (inbox_cancel_requests = false)", file=sys.stderr)
        return 1
    try:
        answer_path = control.write_inbox_request(settings, ref)
    except OSError as e:
        print(f"infinitetalk cancel: cannot write to {settings.control_dir}: {e}", file=sys.stderr)
        return 1
    answer = _wait_answer(answer_path, timeout_s)
    if answer is None:
        print(
            f"the daemon did not answer within {timeout_s:g} s (inbox requests need a running daemon); "
            f"the request stays in {settings.control_dir}",
            file=sys.stderr,
        )
        return 1
    return _print_answer(answer)


def run_request(args: argparse.Namespace) -> int:
    from daemon import control
    from daemon.supervisor import acquire_lock, lock_is_held

    settings = _settings(args)
    if getattr(args, "inbox", False) or (args.action == "cancel" and _state_dir_closed(settings.state_dir)):
        return run_inbox_cancel(settings, args.job_id, args.timeout)
    if _state_dir_closed(settings.state_dir):
        print(
            f"infinitetalk {args.action}: no access to the state dir {settings.state_dir}; {args.action} "
            "needs the daemon's user or root (upload-group users may only cancel: `cancel --inbox`)",
            file=sys.stderr,
        )
        return 1
    if lock_is_held(settings.state_dir):
        answer_path = control.write_request(settings, args.action, args.job_id)
        answer = _wait_answer(answer_path, args.timeout)
        if answer is not None:
            return _print_answer(answer)
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
    return _print_answer(outcome.to_dict())
