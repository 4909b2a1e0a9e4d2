"""Intake: inbox entries become ledger jobs, complete and claimed, or rejected with a reason.

For each entry found by `inbox.scan` (called on every filesystem hint, at start, every
`rescan_s`, and after an inotify overflow):

1. first sight: a `waiting` row ("checking upload");
2. the job JSON is parsed (`daemon.jobs.parse_job`); a media file that is not there yet keeps
   the job waiting ("incomplete upload: waiting for voice.wav"); any other error rejects it,
   once its files have been quiet for `settle_s` (a JSON still being written is not judged);
3. complete when every `checksums` hash matches, or, without checksums, when the files have
   been quiet for `settle_s`; then every media file is decoded to the end (a truncated upload
   or a corrupt file is rejected with `bad_media` naming the file);
4. admission, in arrival order, while fewer than `max_queued` are queued: the inputs are claimed
   by renaming them into `<state_dir>/jobs/<id>/input/` (an upload that changes the inbox
   later cannot alter the render), hashed, and checked against earlier jobs for duplicates;
   over the cap the entry stays untouched in the inbox, `waiting` ("queue full");
5. an entry still incomplete after `incomplete_timeout_s` is rejected (`incomplete`).

Rejection moves the originals to `outbox/failed/<name>/` and writes `outbox/<name>.error.json`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import inbox as inbox_mod
from daemon.config import Settings
from daemon.endings import Endings
from daemon.errors import JobRejected, LedgerConflict, is_disk_full
from daemon.jobs import (
    MAX_FOLDER_DEPTH,
    SETTINGS,
    SILENT,
    InvalidJob,
    JobSpec,
    NotRegularFile,
    describe_mode,
    open_regular,
    parse_job,
    read_regular,
    sha256_file,
)
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox, restore_loose_job_name
from daemon.states import Intent
from pipeline.av_input import open_input
from pipeline.tts_text import KOKORO_DIR, VOICES_DIR, TtsRequest, unknown_voice
from pipeline.weights_layout import has_weights

logger = logging.getLogger(__name__)

#: errors of parse_job that mean "the upload is not finished yet" rather than "the job is bad"
INCOMPLETE_CODES = frozenset({"missing_file", "empty_file"})


@dataclass(slots=True)
class _Track:
    """What intake remembers about one inbox entry between scans (memory only)."""

    job_id: str
    sig: tuple[Any, ...] = ()
    sig_since: float = 0.0
    #: monotonic time `incomplete_timeout_s` counts from (never the wall clock, which may step)
    waiting_since: float = 0.0
    probed_sig: tuple[Any, ...] | None = None
    probe: Future[None] | None = None
    probe_sig: tuple[Any, ...] | None = None
    hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)

    def hash(self, path: Path) -> str | None:
        """The sha256 of `path` (None: not there), remembered by its size and mtime."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self.hashes:
            self.hashes[key] = sha256_file(path)
        return self.hashes[key]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """An entry that is complete and valid, waiting for room in the queue."""

    entry: inbox_mod.Entry
    row: JobRow
    spec: JobSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class _Look:
    """One check of one inbox entry at one scan: what the gates of `Intake._check` share."""

    entry: inbox_mod.Entry
    row: JobRow
    track: _Track
    tree: inbox_mod.BundleTree | None
    sig: tuple[Any, ...]
    now: float
    #: the files unchanged for `settle_s`
    quiet: bool
    #: waiting for `incomplete_timeout_s` already: a gate that would wait rejects instead
    timed_out: bool
    settings: Settings
    ledger: Ledger

    def wait(self, reason: str, code: str = "incomplete", fld: str = "") -> None:
        """Keep the entry waiting with `reason` (None: the check stops here), or reject it with
        `code` once it has waited `incomplete_timeout_s`."""
        if self.timed_out:
            raise JobRejected(
                code, f"still incomplete after {self.settings.incomplete_timeout_s:g} s: {reason}", field=fld
            )
        self.ledger.set_waiting_reason(self.row.id, reason)


def _bundle_tree(entry: inbox_mod.Entry) -> inbox_mod.BundleTree | None:
    """Gate 1: a loose job file or a bundle that is a symbolic link is rejected; a bundle's tree
    is walked (a bad tree is rejected); a loose job has none."""
    if entry.kind == "loose" and entry.job_file.is_symlink():
        raise JobRejected(
            "symlink",
            f"{entry.name}.json is a symbolic link, which is not allowed",
            field=entry.job_file.name,
        )
    if entry.kind == "bundle" and entry.path.is_symlink():
        raise JobRejected(
            "symlink", f"bundle {entry.name} is a symbolic link, which is not allowed", field=entry.name
        )
    try:
        return inbox_mod.walk_bundle(entry.path) if entry.kind == "bundle" else None
    except inbox_mod.BadBundle as e:
        raise JobRejected(e.code, f"bundle {entry.name}: {e.message}", field=entry.name) from e


def _job_file_ready(look: _Look) -> bool:
    """Gate 2: the job file is there, a regular file within `max_json_kb`, and the bundle has no
    temporary upload files left."""
    job_file, max_kb = look.entry.job_file, look.settings.max_json_kb
    try:
        st = os.lstat(job_file)
    except FileNotFoundError:
        look.wait(f"incomplete upload: no {inbox_mod.BUNDLE_JOB_FILE} yet", fld=inbox_mod.BUNDLE_JOB_FILE)
        return False
    if not stat.S_ISREG(st.st_mode):
        raise JobRejected(
            "not_a_file",
            f"{job_file.name} is {describe_mode(st.st_mode)}, not a regular file",
            field=job_file.name,
        )
    if st.st_size > max_kb * 1024:
        raise JobRejected(
            "too_large",
            f"{job_file.name} is {st.st_size} bytes, over max_json_kb ({max_kb:g} KiB)",
            field=job_file.name,
        )
    if look.tree is not None and look.tree.uploading:
        look.wait("upload in progress (temporary files in the bundle)")
        return False
    return True


def _complete(look: _Look, spec: JobSpec) -> bool:
    """Gate 4: complete when every `checksums` hash matches; without checksums, once quiet for
    `settle_s` (and for `stream_settle_s` when a WAV gives no size in its header)."""
    s, track, base = look.settings, look.track, look.entry.base_dir
    if spec.checksums:
        bad = [name for name, digest in spec.checksums if track.hash(base / name) != digest]
        if bad:
            look.wait(
                f"incomplete upload: checksum mismatch for {', '.join(bad)}", "checksum_mismatch", bad[0]
            )
            return False
        return True
    if not look.quiet:
        look.wait(
            f"settling: files changed {look.now - track.sig_since:.0f} s ago (settle_s = {s.settle_s:g})"
        )
        return False
    if look.now - track.sig_since < s.stream_settle_s:
        streamed = [rel for rel in spec.media_files if _is_wav(rel) and wav_size_unknown(base / rel)]
        if streamed:
            # no size in the header: only a longer quiet can say the writer is done
            look.wait(
                f"settling: {', '.join(streamed)} gives no size in its WAV header (streamed); "
                f"complete once quiet for stream_settle_s = {s.stream_settle_s:g} s "
                "(give checksums, or stage the upload, to skip this wait)",
                fld=streamed[0],
            )
            return False
    return True


class Intake:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        endings: Endings | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.outbox = outbox
        #: rejections and the recovery of claims and rejections (the daemon's, or one of its own)
        self.endings = endings or Endings(settings, ledger, outbox)
        #: the inbox sources of the current scan (a claim whose upload is back is redone by it)
        self._present: set[str] = set()
        #: timeouts and settling run on `clock` (monotonic); `wall_clock` only dates rows
        self.clock = clock
        self.wall_clock = wall_clock
        self._tracks: dict[str, _Track] = {}
        self._probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        #: set by the daemon: called when a background probe finishes (wakes the main loop)
        self.wake_later: Callable[[], None] = lambda: None
        self._loose_media: dict[str, set[str]] = {}

    def close(self) -> None:
        self._probes.shutdown(wait=False, cancel_futures=True)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------ the scan

    def scan_once(self) -> None:
        """Look at the whole inbox once: record, check, admit or reject every entry."""
        s = self.settings
        s.inbox.mkdir(parents=True, exist_ok=True)
        entries = inbox_mod.scan(s.inbox)
        self._loose_media = {e.source: set(e.media) for e in entries if e.kind == "loose"}
        present = self._present = {e.source for e in entries}
        self.endings.recover(self)  # rejections and claims a killed daemon left halfway
        # what the finished rejections and claims just moved or pruned is no new job
        entries = [e for e in entries if os.path.lexists(e.path)]
        waiting = self.ledger.active_by_source()
        ready: list[Ready] = []
        for entry in entries:
            row = waiting.get(entry.source)
            if row is None:
                row = self.ledger.insert_job(
                    name=entry.name, source=entry.source, state="waiting", waiting_reason="checking upload"
                )
            try:
                result = self._check(entry, row)
            except JobRejected as rejected:
                try:
                    self.reject(row, entry, rejected)
                except OSError as e:  # e.g. the originals cannot be moved yet: finished at a later scan
                    if is_disk_full(e):
                        raise
                    logger.warning("job %s (%s): rejection not finished yet: %s", row.id, row.name, e)
                continue
            except OSError as e:  # e.g. a file the daemon may not read: report it, keep serving
                logger.warning("job %s (%s): cannot check it yet: %s", row.id, row.name, e)
                self.ledger.set_waiting_reason(row.id, f"cannot read the upload: {e.strerror or e}")
                continue
            except Exception as e:  # noqa: BLE001 - one odd entry must not stop the daemon
                if isinstance(e, sqlite3.Error):
                    raise  # the ledger itself (e.g. a full state dir): the supervisor decides
                logger.exception("job %s (%s): unexpected error while checking it", row.id, row.name)
                self.ledger.set_waiting_reason(
                    row.id, f"internal error while checking: {type(e).__name__}: {e}"
                )
                continue
            if result is not None:
                ready.append(result)
        self._cancel_removed(waiting, present)
        self._admit(sorted(ready, key=lambda r: r.row.seq))

    def _cancel_removed(self, waiting: dict[str, JobRow], present: set[str]) -> None:
        """A waiting entry gone from the inbox before it was claimed is cancelled (`removed`)."""
        for source, row in waiting.items():
            claimed = row.job_dir and any(
                os.path.lexists(Path(row.job_dir) / part) for part in ("input", UPLOAD_DIR)
            )
            if source not in present and not claimed:
                self._tracks.pop(source, None)
                try:
                    self.ledger.transition(
                        row.id,
                        "waiting",
                        "cancelled",
                        finished_at=time.time(),
                        job_dir=None,
                        error_code="removed",
                        error_message=_gone_reason(Path(source)),
                    )
                except LedgerConflict:
                    pass

    # ------------------------------------------------------------------ completeness

    def _waited_before(self, row: JobRow) -> float:
        """How long an entry already waited when this daemon first looks at it: ~0 for a new
        row; for one from before a restart, its age by the wall clock (the only clock that spans
        a restart), but at most half of `incomplete_timeout_s`, so that a clock stepped forward
        meanwhile cannot reject an upload at once."""
        age_s = self.wall_clock() - row.created_at
        return min(max(0.0, age_s), self.settings.incomplete_timeout_s / 2)

    def _check(self, entry: inbox_mod.Entry, row: JobRow) -> Ready | None:
        """The gates an entry passes, in order, to be `Ready`: its links and bundle tree, its job
        file (there, regular, small), its parse, its completeness (checksums or quiet), its media
        decoded. A gate that waits records the reason and stops the check (None); one that
        rejects raises `JobRejected`."""
        look = self._look(entry, row)
        if not _job_file_ready(look):
            return None
        spec = self._read_spec(look)
        if spec is None or not _complete(look, spec) or not self._probed(look, spec):
            return None
        return Ready(entry=entry, row=row, spec=spec)

    def _look(self, entry: inbox_mod.Entry, row: JobRow) -> _Look:
        """Gate 1: links refused and the bundle walked; then the entry's signature, how long it
        has been quiet and whether it has waited too long."""
        s = self.settings
        now = self.clock()
        track = self._tracks.get(entry.source)
        if track is None or track.job_id != row.id:
            track = self._tracks[entry.source] = _Track(
                job_id=row.id, sig_since=now, waiting_since=now - self._waited_before(row)
            )
        tree = _bundle_tree(entry)
        sig = inbox_mod.signature(self._entry_files(entry, tree))
        if sig != track.sig:
            track.sig, track.sig_since = sig, now
        return _Look(
            entry=entry,
            row=row,
            track=track,
            tree=tree,
            sig=sig,
            now=now,
            quiet=now - track.sig_since >= s.settle_s,
            timed_out=now - track.waiting_since >= s.incomplete_timeout_s,
            settings=s,
            ledger=self.ledger,
        )

    def _read_spec(self, look: _Look) -> JobSpec | None:
        """Gate 3: the job file read and parsed; None while a media file is still to come or the
        job file is still changing."""
        entry = look.entry
        try:
            raw = read_regular(entry.job_file, max_bytes=self._max_json_bytes())  # never blocks on a FIFO
        except NotRegularFile as e:
            raise JobRejected("not_a_file", str(e), field=entry.job_file.name) from e
        try:
            return self._parse(raw, entry.base_dir, loose=entry.kind == "loose")
        except InvalidJob as e:
            incomplete = [err for err in e.errors if err.code in INCOMPLETE_CODES]
            # (a checksum of a file not there yet is no error of its own; a checksum naming no
            # file of the job, e.g. "../face.png", is, and rejects the job at once)
            if incomplete and len(incomplete) == len(e.errors):
                names = ", ".join(err.field for err in incomplete)
                look.wait(f"incomplete upload: waiting for {names}", fld=incomplete[0].field)
                return None
            if not look.quiet:
                look.wait("upload in progress (job file changing)")
                return None
            # named by the first error that waiting cannot cure (not a file still to come)
            first = next((err for err in e.errors if err.code not in INCOMPLETE_CODES), e.errors[0])
            raise JobRejected(first.code, str(e), field=first.field) from e

    def _probed(self, look: _Look, spec: JobSpec) -> bool:
        """Gate 5: every media file decoded to the end (`probe_job`, raising `JobRejected` for bad
        media), once per signature. Decoding a long video takes a while: probes run in a
        background thread so the main loop keeps serving (progress, dispatch, watchdog); the
        result is picked up by a later scan, and only if the files are still the ones probed."""
        track, sig, s = look.track, look.sig, self.settings
        if track.probed_sig == sig:
            return True
        if track.probe is None or track.probe_sig != sig:
            if track.probe is not None:
                track.probe.cancel()
            self.ledger.set_waiting_reason(look.row.id, "checking media")
            track.probe_sig = sig
            track.probe = self._probes.submit(
                probe_job, look.entry.base_dir, spec, s.min_audio_s, s.max_audio_s
            )
            track.probe.add_done_callback(lambda _: self.wake_later())
            return False
        if not track.probe.done():
            return False
        probe, track.probe = track.probe, None
        probe.result()  # raises JobRejected for bad media
        track.probed_sig = sig
        return True

    def _parse(self, raw: bytes, base_dir: Path, *, loose: bool = False) -> JobSpec:
        """`loose`: a loose job of the inbox (`base_dir`), whose media paths must be loose files
        or files of a media folder (`inbox.loose_path_problem`)."""
        rule = functools.partial(inbox_mod.loose_path_problem, base_dir) if loose else None
        spec = parse_job(raw, base_dir=base_dir, defaults=self.settings.job_defaults(), loose_paths=rule)
        if spec.tts is not None and (why := tts_voice_problem(self.settings, spec.tts)):
            raise InvalidJob.single("bad_value", why, field=why.split(":", 1)[0])
        if spec.seed_drawn and self.settings.defaults.seed is not None:
            spec = spec.with_seed(self.settings.defaults.seed)
        return spec

    def _entry_files(self, entry: inbox_mod.Entry, tree: inbox_mod.BundleTree | None) -> list[Path]:
        if tree is not None:
            return [*tree.files, *(entry.path / rel for rel in tree.special)]
        names = self._loose_media.get(entry.source, set())
        return [entry.job_file, *(entry.base_dir / n for n in sorted(names))]

    # ------------------------------------------------------------------ admission

    def _admit(self, ready: list[Ready]) -> None:
        s = self.settings
        for item in ready:
            if self.ledger.counts()["queued"] >= s.max_queued:
                self.ledger.set_waiting_reason(item.row.id, f"queue full ({s.max_queued} queued)")
                continue
            try:
                self.claim(item)
            except inbox_mod.BadBundle as e:  # the tree grew past the bounds while it was taken
                self._reject_claimed(item.row, JobRejected(e.code, e.message, field=""))
            except JobRejected as rejected:
                self._reject_claimed(item.row, rejected)
            except OSError as e:  # the rename failed (permissions, vanished file): retried next scan
                if is_disk_full(e):
                    raise  # the state dir is full: the supervisor pauses intake; resumed at a later scan
                logger.warning("job %s (%s): cannot take it yet: %s", item.row.id, item.row.name, e)
                self.ledger.set_waiting_reason(item.row.id, f"cannot take the upload: {e.strerror or e}")

    def claim(self, item: Ready) -> JobRow | None:
        """Take the inputs into the state dir, hash them, check for a duplicate, queue the job.

        The job dir is recorded in the ledger before anything moves (intent `claim`), so a
        daemon killed halfway finishes the claim at its next scan (`Endings.recover` calls
        `resume_claim`). The entry is renamed into `jobs/<id>/upload/` (across filesystems:
        copied), then copied into the
        daemon's own `jobs/<id>/input/` (`copy_inputs`), which is what is hashed and rendered.
        """
        row, entry = item.row, item.entry
        job_dir = self.settings.jobs_dir / row.id
        input_dir = job_dir / "input"
        upload = job_dir / UPLOAD_DIR
        self.ledger.set_columns(row.id, job_dir=str(job_dir), intent=Intent.claim.value)
        private_dir(self.settings.jobs_dir)
        private_dir(job_dir)
        # a bundle copied straight from the inbox (another filesystem) is removed from it after
        # the copy, also when that copy was finished before a restart
        copied_bundle = entry.kind == "bundle" and input_dir.is_dir()
        if not input_dir.is_dir():
            if entry.kind == "bundle" and not os.path.lexists(upload):
                try:
                    os.rename(entry.path, upload)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    copy_inputs(entry.path, job_dir)  # another filesystem: straight from the inbox
                    copied_bundle = True
            elif entry.kind == "loose":
                upload.mkdir(exist_ok=True)
                shared = self._shared_loose_media(entry.source)
                take_loose_files(self.settings.inbox, entry.job_file, upload, item.spec.media_files, shared)
            if not input_dir.is_dir():
                copy_inputs(upload, job_dir)
        self._tracks.pop(entry.source, None)
        remove_taken(upload, entry.path if copied_bundle else None)
        return self._complete_claim(row, input_dir)

    def _complete_claim(self, row: JobRow, input_dir: Path) -> JobRow | None:
        try:
            job_file = input_dir / inbox_mod.BUNDLE_JOB_FILE
            spec = self._parse(read_regular(job_file, max_bytes=self._max_json_bytes()), input_dir)
        except (InvalidJob, OSError) as e:
            code, fld = (e.code, e.field) if isinstance(e, InvalidJob) else ("missing_file", "job.json")
            raise JobRejected(code, f"the job changed while it was taken: {e}", field=fld) from e
        hashes = {rel: sha256_file(input_dir / rel) for rel in spec.media_files}
        for name, digest in spec.checksums:
            if hashes.get(name) != digest:
                raise JobRejected(
                    "checksum_mismatch",
                    f"{name} changed while it was taken (sha256 {hashes.get(name)} != {digest})",
                    field=name,
                )
        key = dedupe_key(spec, hashes)
        original = self.ledger.find_duplicate(key)
        rerender_of = None
        if original is not None and original.id != row.id and spec.rerender:
            rerender_of = original.id  # asked for: rendered again, linked to the first
        elif original is not None and original.id != row.id:
            raise JobRejected(
                "duplicate",
                f"same inputs and settings as job {original.id} ({original.name}, {original.state})",
                field="",
                duplicate_of=original.id,
            )
        self.ledger.set_columns(
            row.id,
            spec_json=spec.to_json(),
            input_hashes_json=json.dumps(hashes, sort_keys=True),
            dedupe_key=key,
            priority=spec.priority,
            rerender_of=rerender_of,
            intent=None,  # the claim is complete: what is left is admission
        )
        admitted = self.ledger.admit(row.id, max_queued=self.settings.max_queued)
        if admitted is None:
            self.ledger.set_waiting_reason(row.id, f"queue full ({self.settings.max_queued} queued)")
        else:
            logger.info("job %s (%s) queued, seed %d", row.id, row.name, spec.seed)
        return admitted

    def _max_json_bytes(self) -> int:
        return int(self.settings.max_json_kb * 1024)

    def resume_claim(self, row: JobRow) -> None:
        """`Uploads.resume_claim`: finish a claim a killed daemon left halfway (job dir recorded,
        spec not yet stored); one whose upload is back in the inbox is redone by the scan."""
        if row.source in self._present or not row.job_dir:
            return
        job_dir = Path(row.job_dir)
        input_dir, upload = job_dir / "input", job_dir / UPLOAD_DIR
        job_file = inbox_mod.BUNDLE_JOB_FILE
        if not (input_dir / job_file).is_file() and not (upload / job_file).is_file():
            return
        logger.info("job %s (%s): finishing a claim interrupted by a restart", row.id, row.name)
        try:
            if not input_dir.is_dir():
                if Path(row.source).suffix.lower() == ".json":  # loose: its media may still be in the inbox
                    media = inbox_mod.loose_media_names(upload / job_file)
                    shared = self._shared_loose_media(row.source)
                    take_loose_files(self.settings.inbox, None, upload, media, shared)
                copy_inputs(upload, job_dir)
            remove_taken(upload)
            self._complete_claim(row, input_dir)
        except inbox_mod.BadBundle as e:
            self._reject_claimed(row, JobRejected(e.code, e.message, field=""))
        except JobRejected as rejected:
            self._reject_claimed(row, rejected)
        except OSError as e:
            logger.warning("job %s (%s): cannot finish its claim yet: %s", row.id, row.name, e)

    def admit_claimed(self) -> None:
        """Claimed jobs left waiting (queue was full, or a restart in between) get queued as room frees."""
        for row in self.ledger.jobs(["waiting"]):
            if not row.job_dir or not row.spec_json:
                continue
            if self.ledger.admit(row.id, max_queued=self.settings.max_queued) is None:
                return

    def _shared_loose_media(self, source: str) -> set[str]:
        others: set[str] = set()
        for other, names in self._loose_media.items():
            if other != source and Path(other).exists():
                others |= names
        return others

    # ------------------------------------------------------------------ rejection

    def reject(self, row: JobRow, entry: inbox_mod.Entry, rejected: JobRejected) -> None:
        """Reject an entry still in the inbox: keep its files under outbox/failed/, write error.json."""
        self._tracks.pop(entry.source, None)
        shared = self._shared_loose_media(row.source)

        def keep(r: JobRow) -> None:
            keep_inbox_originals(self.settings.inbox, entry.path, Path(str(r.originals)), shared)

        self.endings.reject(row, rejected, keep)

    def _reject_claimed(self, row: JobRow, rejected: JobRejected) -> None:
        self.endings.reject(row, rejected, self._keep_claimed_originals)

    def keep_rejected(self, row: JobRow) -> None:
        """`Uploads.keep_rejected`: what a claim took, else the inbox entry, into the originals."""
        if not (row.job_dir and self._keep_claimed_originals(row)):
            shared = self._shared_loose_media(row.source)
            keep_inbox_originals(self.settings.inbox, Path(row.source), Path(str(row.originals)), shared)

    def _keep_claimed_originals(self, row: JobRow) -> bool:
        """Move what a claim took (the daemon's copy, else the upload as renamed) to the originals
        folder; False if the claim had taken nothing yet."""
        job_dir = Path(row.job_dir) if row.job_dir else self.settings.jobs_dir / row.id
        kept = Path(str(row.originals))
        for taken in (job_dir / "input", job_dir / UPLOAD_DIR):
            if not os.path.lexists(taken):
                continue
            _clear_empty(kept)
            move_upload(taken, kept)
            restore_loose_job_name(kept, row.name, row.source)
            remove_taken(job_dir / UPLOAD_DIR)
            if taken.name == "input":
                _adopt_group(kept, self.outbox.root)
            return True
        return False


def take_loose_files(inbox: Path, job_file: Path | None, upload: Path, media: Any, shared: set[str]) -> None:
    """Move a loose job's JSON (unless already taken) and its media into `upload`: a loose
    file of the inbox is moved (copied if another loose job of the inbox also names it:
    `shared`); a file of a media folder is always copied (`copy_media_file`), never moved, so a
    folder that is really a bundle still being uploaded keeps all its files. A path the rule
    refuses now (its folder got a job.json meanwhile) rejects the job."""
    if job_file is not None and not os.path.lexists(upload / inbox_mod.BUNDLE_JOB_FILE):
        move_upload(job_file, upload / inbox_mod.BUNDLE_JOB_FILE)
    for rel in sorted(media):
        refused = inbox_mod.loose_path_problem(inbox, rel)
        if refused is not None:  # the JSON is taken: a rejection keeps it as the original
            raise JobRejected("path_escape", f"{rel!r} {refused}; not taken", field=rel)
    for rel in sorted(media):
        target = upload / rel
        if os.path.lexists(target):
            continue  # taken before a restart
        if "/" in rel or rel in shared:
            copy_media_file(inbox, rel, target)
        elif inbox_mod.plain_file_in(inbox, rel):  # else gone, or not a regular file: not taken
            move_upload(inbox / rel, target)


def remove_taken(upload: Path, bundle: Path | None = None) -> None:
    """After the copy: the upload as renamed (and a bundle copied across filesystems)."""
    for path in (upload, bundle):
        if path is None or not os.path.lexists(path):
            continue
        try:
            remove_tree(path)
        except OSError as e:  # e.g. a folder the daemon may not write: the copy is what counts
            logger.warning("cannot remove %s after taking it: %s", path, e)


def keep_inbox_originals(inbox: Path, src: Path, kept: Path, shared: set[str]) -> None:
    """Move an inbox entry `src` and its loose media into `kept` (`move_upload`: across
    filesystems too, FIFOs and deep trees included, never crashing); a loose media file that
    another loose job of the inbox (`shared`) also names is copied."""
    if src.is_dir() and not src.is_symlink():
        _clear_empty(kept)
        move_upload(src, kept)
        return
    kept.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(src):
        media = inbox_mod.loose_media_names(src)
        move_upload(src, kept / src.name)
        for rel in sorted(media):
            path = inbox / rel
            if "/" in rel or not inbox_mod.plain_file_in(inbox, rel):
                continue  # only loose files of the inbox: a media folder's files stay put
            if rel in shared:
                copy_regular(path, kept / rel)
            else:
                move_upload(path, kept / rel)


def _adopt_group(kept: Path, outbox: Path) -> None:
    """The daemon's copies kept as a rejected job's originals get the outbox's group (as files
    made there do), so the uploaders who may read the outbox can read them. Best effort."""
    try:
        gid = os.stat(outbox).st_gid
        for root, dirs, files in os.walk(kept):
            for name in (*dirs, *files):
                path = os.path.join(root, name)
                if os.lstat(path).st_gid != gid:
                    os.chown(path, -1, gid, follow_symlinks=False)
        if os.lstat(kept).st_gid != gid:
            os.chown(kept, -1, gid, follow_symlinks=False)
    except OSError as e:
        logger.debug("originals %s keep the daemon's group: %s", kept, e)


def _clear_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# ---------------------------------------------------------------------- taking files from uploaders
#
# What is rendered must be exactly what was claimed and hashed, whatever an uploader does later:
# a process whose working directory is inside a bundle still reaches that folder after it is
# renamed into the state dir, and a writer holding a file open can still change it. So the claim
# renames the entry into `jobs/<id>/upload/` (off the inbox at once), then *copies* it into a new
# folder of the daemon's own, `jobs/<id>/input/` (`copy_inputs`), in a job dir only the daemon
# may enter (0700), opening every file without following links and only if it is a regular file.
# The render reads that copy, and the worker checks its hashes before it starts.

UPLOAD_DIR = "upload"
PARTIAL_INPUT_DIR = ".input.partial"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def private_dir(path: Path) -> Path:
    """`path` as a folder only the daemon's user may enter (0700), made if needed."""
    path.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def copy_inputs(src: Path, job_dir: Path) -> Path:
    """Copy the uploaded tree `src` into `job_dir/input` (via a partial folder renamed at the end):
    regular files and folders only, each opened without following a link (FIFOs, sockets,
    devices and symbolic links are left behind), bounded by MAX_FOLDER_DEPTH and
    MAX_BUNDLE_ENTRIES. Returns the input folder."""
    partial = job_dir / PARTIAL_INPUT_DIR
    remove_tree(partial)
    try:
        copy_tree(src, partial, links=False)
    except BaseException:
        remove_tree(partial)  # e.g. a full state dir: give the room back
        raise
    input_dir = job_dir / "input"
    os.rename(partial, input_dir)
    return input_dir


def copy_tree(src: Path, dest: Path, *, links: bool) -> None:
    """Copy the folder `src` to the new folder `dest` without ever following a symbolic link or
    opening anything but a regular file; `links`: symbolic links are copied as links (the
    originals kept for a rejected job), else left out. Raises `inbox.BadBundle` past the bounds."""
    fd = os.open(src, _DIR_FLAGS)
    try:
        budget = [inbox_mod.MAX_BUNDLE_ENTRIES]
        os.mkdir(dest, 0o750)
        _copy_dir(fd, dest, 0, budget, links)
    finally:
        os.close(fd)


def _copy_dir(fd: int, dest: Path, depth: int, budget: list[int], links: bool) -> None:
    """`links` (originals of a rejected job): past the bounds, what is left is left out (logged),
    never an error; else (a claim) the bounds raise `inbox.BadBundle`."""
    with os.scandir(fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    budget[0] -= len(entries)
    if budget[0] < 0:
        if links:
            logger.warning("%s: over %d entries; the rest is not kept", dest, inbox_mod.MAX_BUNDLE_ENTRIES)
            return
        raise inbox_mod.BadBundle("too_large", f"more than {inbox_mod.MAX_BUNDLE_ENTRIES} files and folders")
    for entry in entries:
        name = entry.name
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode):
            if depth + 1 >= MAX_FOLDER_DEPTH:
                if links:
                    logger.warning("%s: folders deeper than %d levels are not kept", dest, MAX_FOLDER_DEPTH)
                    continue
                raise inbox_mod.BadBundle(
                    "too_deep", f"folders nested more than {MAX_FOLDER_DEPTH} levels deep"
                )
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            try:
                os.mkdir(dest / name, 0o750)
                _copy_dir(sub, dest / name, depth + 1, budget, links)
            finally:
                os.close(sub)
        elif stat.S_ISREG(mode):
            try:
                source = open_regular(name, dir_fd=fd)
            except (NotRegularFile, FileNotFoundError):
                continue  # swapped for something else meanwhile: not taken
            with os.fdopen(source, "rb") as f_in:
                copy_file_object(f_in, dest / name)
        elif stat.S_ISLNK(mode) and links:
            os.symlink(os.readlink(name, dir_fd=fd), dest / name)
        else:
            logger.info("%s: %s left out (%s)", dest, name, describe_mode(mode))


def copy_file_object(f_in: Any, dest: Path) -> None:
    """Copy an open file to the new file `dest` (never through a link at `dest`), fsynced."""
    out = os.open(
        dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o640
    )
    with os.fdopen(out, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 20)
        f_out.flush()
        os.fsync(f_out.fileno())
    st = os.fstat(f_in.fileno())
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_media_file(root: Path, rel: str, dest: Path) -> None:
    """Copy `root/rel` (a file of a loose job's media folder, or a loose file another loose job
    also names) to the new file `dest`, made with its folders: each folder on the way and the
    file itself opened without following a link, and only a regular file read (`open_regular`);
    written under a temporary name and renamed, so a kill mid-copy never leaves a short file
    at `dest`. A missing file is skipped (the claim then finds it missing); a link swapped in on
    the way raises OSError (ELOOP, ENOTDIR)."""
    *folders, name = rel.split("/")
    partial = dest.with_name(f".{dest.name}.copying")
    if os.path.lexists(partial):
        os.unlink(partial)
    fd = os.open(root, _DIR_FLAGS)
    try:
        for folder in folders:
            sub = os.open(folder, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
        source = open_regular(name, dir_fd=fd)
    except FileNotFoundError:
        return
    finally:
        os.close(fd)
    with os.fdopen(source, "rb") as f_in:
        dest.parent.mkdir(parents=True, exist_ok=True)
        copy_file_object(f_in, partial)
    os.rename(partial, dest)


def copy_regular(src: Path, dest: Path) -> None:
    """Copy one uploaded regular file (`open_regular`: no link, no FIFO) to the new file `dest`."""
    with os.fdopen(open_regular(src), "rb") as f_in:
        copy_file_object(f_in, dest)


def remove_tree(path: Path) -> None:
    """Remove a file or a folder tree of any depth without recursion and without following links:
    each sub-folder is first moved up to `path` itself, so no path ever gets long."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        os.unlink(path)
        return
    serial = 0
    stack = [path]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if folder == path:
                    stack.append(Path(entry.path))
                    continue
                while True:
                    serial += 1
                    flat = path / f".rm-{serial}"
                    if not os.path.lexists(flat):
                        break
                os.rename(entry.path, flat)
                stack.append(flat)
            else:
                os.unlink(entry.path)
        if folder != path:
            os.rmdir(folder)  # emptied: its files unlinked, its folders moved up to `path`
    os.rmdir(path)


def move_upload(src: Path, dest: Path) -> None:
    """Move an uploader's entry (file or tree) to `dest`: a rename; across filesystems a copy that
    never follows links nor opens a FIFO (`copy_tree`, FIFOs and devices are left out), renamed
    into place, then the source removed (`remove_tree`). Never raises for a FIFO."""
    try:
        os.rename(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{dest.name}.copying")
    remove_tree(tmp)
    mode = os.lstat(src).st_mode
    if stat.S_ISDIR(mode):
        copy_tree(src, tmp, links=True)
    elif stat.S_ISREG(mode):
        copy_regular(src, tmp)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), tmp)
    else:  # a FIFO, a socket, a device: nothing to keep but its name
        logger.info("%s is %s: not copied to %s", src, describe_mode(mode), dest)
        os.unlink(src)
        return
    os.rename(tmp, dest)
    remove_tree(src)


def claimed_inputs(input_hashes_json: str | None, input_dir: Path) -> tuple[tuple[str, str], ...]:
    """(absolute path, sha256) of each input a claim hashed (the ledger's `input_hashes_json`),
    for the worker to check before it renders (`daemon.runner.verify_inputs`)."""
    hashes = json.loads(input_hashes_json or "{}")
    return tuple((str(input_dir / rel), str(digest)) for rel, digest in sorted(hashes.items()))


def wav_size_unknown(path: Path) -> bool:
    """True for a WAV whose header gives no size (0 or 0xFFFFFFFF in the RIFF or data chunk size:
    written to a pipe, or still being written in place): its length proves nothing."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return False
            if int.from_bytes(head[4:8], "little") in (0, 0xFFFFFFFF):
                return True
            pos = 12
            for _ in range(64):
                f.seek(pos)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return False
                declared = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"data":
                    return declared in (0, 0xFFFFFFFF)
                pos += 8 + declared + (declared & 1)
    except OSError:
        return False
    return False


def tts_voice_problem(settings: Settings, request: TtsRequest) -> str | None:
    """A text-to-speech job's unknown voice ('tts_audio.human1_voice: ...'), judged when the
    weights folder the worker reads (the tiny one when it falls back) has a voices folder;
    without one, the render names what to download (`tts_unavailable`)."""
    folder = settings.weights_dir if has_weights(settings.weights_dir) else settings.tiny_weights_dir
    if not (folder / KOKORO_DIR / VOICES_DIR).is_dir():
        return None
    return unknown_voice(folder, request)


def dedupe_key(spec: JobSpec, hashes: dict[str, str]) -> str:
    """Same media content (by role) and same settings give the same key; a drawn seed is ignored."""
    values = spec.to_dict()
    settings = dict(values)
    for key in ("cond_video", "cond_audio", "checksums", "seed_drawn"):
        settings.pop(key, None)
    for s in SETTINGS:  # each setting's `dedupe` rule (e.g. APG's only while on: older jobs' keys hold)
        if not s.in_dedupe_key(values):
            settings.pop(s.name, None)
    if spec.seed_drawn:
        settings.pop("seed", None)
    roles = {
        "cond_video": hashes[spec.cond_video],
        **{person: "silent" if path == SILENT else hashes[path] for person, path in spec.cond_audio},
    }
    blob = json.dumps({"inputs": roles, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _gone_reason(source: Path) -> str:
    """Why a waiting entry is no job any more: gone from the inbox, or a folder that turned out to
    hold a loose job's media (the loose JSON arrived after the folder)."""
    if source.is_dir() and not source.is_symlink():
        return "not a job: the folder has no job.json and holds media of a loose job in the inbox"
    return "removed from the inbox before it was taken"


# ---------------------------------------------------------------------- decode probes


#: the lowest sample rate accepted for speech (a header saying 1 Hz would make a 1 KB file an
#: hour of "audio")
MIN_SAMPLE_RATE = 8000


def _is_wav(rel: str) -> bool:
    return rel.lower().endswith(".wav")


def probe_job(base_dir: Path, spec: JobSpec, min_audio_s: float, max_audio_s: float = math.inf) -> None:
    """The intake's media probe of a parsed job (`infinitetalk render` runs it too, before the
    model loads). Each file in its role: the reference's picture (image or video stream), then each speaker's
    sound (an audio file's, or a video's audio stream: the same MP4 may be both). The job's
    length (the longest speech; for `audio_type = "add"` the sum) must be <= `max_audio_s`."""
    probe_media(
        base_dir / spec.cond_video,
        rel=spec.cond_video,
        field="cond_video",
        min_audio_s=min_audio_s,
        max_audio_s=max_audio_s,
    )
    lengths = []
    for person, rel in spec.cond_audio:
        if rel != SILENT:
            field = f"cond_audio.{person}"
            lengths.append(
                probe_media(
                    base_dir / rel,
                    rel=rel,
                    field=field,
                    min_audio_s=min_audio_s,
                    max_audio_s=max_audio_s,
                    speech=True,
                )
            )
    total = (
        sum(lengths) if spec.audio_type == "add" and len(spec.cond_audio) == 2 else max(lengths, default=0.0)
    )
    if total > max_audio_s:
        raise JobRejected(
            "audio_too_long",
            f"the speakers' tracks one after the other (audio_type add) last {total:.1f} s; "
            f"at most max_audio_s = {max_audio_s:g} s is accepted",
            field="cond_audio",
        )


def probe_media(
    path: Path,
    *,
    rel: str,
    field: str,
    min_audio_s: float,
    max_audio_s: float = math.inf,
    speech: bool = False,
) -> float:
    """Decode a media file to the end; raise `JobRejected` naming the file if it cannot be.
    `speech`: the file's audio stream is what counts (an audio file, or a video with sound); its
    duration is returned (0 for a picture). The file is opened once, without following a link
    and only if it is a regular file (`open_regular`: a FIFO swapped in cannot hang the probe),
    and decoded from that descriptor."""
    suffix = path.suffix.lower()
    from daemon.jobs import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS

    try:
        fd = open_regular(path)
    except NotRegularFile as e:
        raise JobRejected("not_a_file", f"{field}: {rel}: {e}", field=field) from e
    with os.fdopen(fd, "rb") as f:
        try:
            if suffix in IMAGE_EXTENSIONS and not speech:
                _probe_image(f)
                return 0.0
            if not (speech or suffix in AUDIO_EXTENSIONS):
                _probe_stream(f, "video")
                return 0.0
            if suffix == ".wav":
                _check_wav_length(f)
            duration = _probe_stream(f, "audio", field=field, rel=rel, max_s=max_audio_s)
            if duration < min_audio_s:
                raise JobRejected(
                    "audio_too_short",
                    f"{field}: {rel} holds {duration:.2f} s of audio; at least {min_audio_s:g} s are needed",
                    field=field,
                )
            return duration
        except JobRejected:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
            raise JobRejected(
                "bad_media", f"{field}: {rel} cannot be decoded: {type(e).__name__}: {e}", field=field
            ) from e


def _check_wav_length(f: Any) -> None:
    """Refuse a WAV whose data chunk declares more bytes than the file holds: a truncated upload
    (e.g. a killed `rsync --partial`). FFmpeg clamps such a duration to the file size and decodes
    the rest without complaint, so the decode alone does not notice."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return  # RF64 and friends: left to the decoder
    pos = 12
    while pos + 8 <= size:
        f.seek(pos)
        chunk = f.read(8)
        declared = int.from_bytes(chunk[4:8], "little")
        if chunk[:4] == b"data":
            if declared not in (0, 0xFFFFFFFF) and pos + 8 + declared > size:
                raise ValueError(
                    f"its data chunk declares {declared} bytes but the file holds only "
                    f"{size - pos - 8} (truncated upload?)"
                )
            return
        pos += 8 + declared + (declared & 1)


def _probe_image(f: Any) -> None:
    from PIL import Image

    f.seek(0)
    with Image.open(f) as img:
        img.load()
        if img.width < 2 or img.height < 2:
            raise ValueError(f"image is {img.width}x{img.height} pixels")


def _decoder_path(f: Any) -> Any:
    """What PyAV opens for the open file `f`: its /proc/self/fd link (the same file, whatever
    its name now points to), else the file object itself."""
    proc = f"/proc/self/fd/{f.fileno()}"
    if os.path.exists(proc):
        return proc
    f.seek(0)
    return f


def _probe_stream(f: Any, kind: str, *, field: str = "", rel: str = "", max_s: float = math.inf) -> float:
    """Decode every frame of the first `kind` stream; returns its duration in seconds. Audio: a
    sample rate below MIN_SAMPLE_RATE is `bad_sample_rate`, more than `max_s` seconds
    `audio_too_long` (decoding stops there)."""
    import av

    with open_input(_decoder_path(f)) as container:
        streams = container.streams.audio if kind == "audio" else container.streams.video
        if not streams:
            raise ValueError(f"no {kind} stream")
        stream = streams[0]
        if kind == "audio":
            _check_rate(stream.codec_context.sample_rate, field, rel)
        end = 0.0
        count = 0
        for frame in container.decode(stream):
            count += 1
            if isinstance(frame, av.AudioFrame):
                _check_rate(frame.sample_rate, field, rel)
                length = frame.samples / float(frame.sample_rate or 1)
                end = end + length if frame.time is None else max(end, frame.time + length)
                if end > max_s:
                    raise JobRejected(
                        "audio_too_long",
                        f"{field}: {rel} holds more than {max_s:g} s of audio (max_audio_s); "
                        "split it into shorter jobs",
                        field=field,
                    )
            elif isinstance(frame, av.VideoFrame) and frame.time is not None:
                end = max(end, frame.time)
        if count == 0:
            raise ValueError(f"no decodable {kind} frames")
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
            # video: `end` is the start of the last frame, so allow a little more than one frame
            if declared > 0 and end < declared - (0.5 if kind == "audio" else 1.0):
                raise ValueError(f"decoded {end:.2f} s of a declared {declared:.2f} s (truncated?)")
        return end


def _check_rate(rate: int | None, field: str, rel: str) -> None:
    if rate is not None and 0 < rate < MIN_SAMPLE_RATE:
        raise JobRejected(
            "bad_sample_rate",
            f"{field}: {rel} says its sample rate is {rate} Hz; speech needs at least {MIN_SAMPLE_RATE} Hz",
            field=field,
        )
