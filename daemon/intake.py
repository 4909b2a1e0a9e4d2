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

import hashlib
import json
import logging
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
from daemon.errors import JobRejected, LedgerConflict
from daemon.jobs import SILENT, InvalidJob, JobSpec, parse_job, sha256_file
from daemon.ledger import JobRow, Ledger
from daemon.outbox import Outbox, move, restore_loose_job_name

logger = logging.getLogger(__name__)

#: errors of parse_job that mean "the upload is not finished yet" rather than "the job is bad"
INCOMPLETE_CODES = frozenset({"missing_file", "empty_file"})
FPS = 25
FULL_FRAME_NUM = 81  # frames per chunk of the released model


@dataclass(slots=True)
class _Track:
    """What intake remembers about one inbox entry between scans (memory only)."""

    job_id: str
    sig: tuple[Any, ...] = ()
    sig_since: float = 0.0
    probed_sig: tuple[Any, ...] | None = None
    probe: Future[None] | None = None
    probe_sig: tuple[Any, ...] | None = None
    hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """An entry that is complete and valid, waiting for room in the queue."""

    entry: inbox_mod.Entry
    row: JobRow
    spec: JobSpec


class Intake:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.outbox = outbox
        self.clock = clock
        self._tracks: dict[str, _Track] = {}
        self._probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        #: set by the daemon: called when a background probe finishes (wakes the main loop)
        self.wake_later: Callable[[], None] = lambda: None
        #: the shortest speech the loaded model can render (None: not known until the model is loaded)
        self.model_min_audio_s: float | None = None
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
        waiting = self.ledger.active_by_source()
        present = {e.source for e in entries}
        self.finish_rejections(waiting)
        self.resume_claims(waiting, present)
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
                logger.info("job %s: %s seen in the inbox", row.id, entry.name)
            try:
                result = self._check(entry, row)
            except JobRejected as rejected:
                self.reject(row, entry, rejected)
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
        for source, row in waiting.items():
            claimed = row.job_dir and (Path(row.job_dir) / "input").exists()
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
        self._admit(sorted(ready, key=lambda r: r.row.seq))

    # ------------------------------------------------------------------ completeness

    def _check(self, entry: inbox_mod.Entry, row: JobRow) -> Ready | None:
        s = self.settings
        now = self.clock()
        track = self._tracks.get(entry.source)
        if track is None or track.job_id != row.id:
            track = self._tracks[entry.source] = _Track(job_id=row.id, sig_since=now)
        files = self._entry_files(entry)
        sig = inbox_mod.signature(files)
        if sig != track.sig:
            track.sig, track.sig_since = sig, now
        quiet = now - track.sig_since >= s.settle_s
        timed_out = time.time() - row.created_at >= s.incomplete_timeout_s

        def wait(reason: str, code: str = "incomplete", fld: str = "") -> None:
            if timed_out:
                raise JobRejected(
                    code, f"still incomplete after {s.incomplete_timeout_s:g} s: {reason}", field=fld
                )
            self.ledger.set_waiting_reason(row.id, reason)

        job_file = entry.job_file
        if entry.kind == "loose" and job_file.is_symlink():
            raise JobRejected(
                "symlink", f"{entry.name}.json is a symbolic link, which is not allowed", field=job_file.name
            )
        if entry.kind == "bundle" and entry.path.is_symlink():
            raise JobRejected(
                "symlink", f"bundle {entry.name} is a symbolic link, which is not allowed", field=entry.name
            )
        try:
            st = os.lstat(job_file)
        except FileNotFoundError:
            wait(f"incomplete upload: no {inbox_mod.BUNDLE_JOB_FILE} yet", fld=inbox_mod.BUNDLE_JOB_FILE)
            return None
        if not stat.S_ISREG(st.st_mode):
            raise JobRejected("not_a_file", f"{job_file.name} is not a regular file", field=job_file.name)
        if st.st_size > s.max_json_kb * 1024:
            raise JobRejected(
                "too_large",
                f"{job_file.name} is {st.st_size} bytes, over max_json_kb ({s.max_json_kb:g} KiB)",
                field=job_file.name,
            )
        if entry.kind == "bundle" and inbox_mod.has_temporary_files(entry.path):
            wait("upload in progress (temporary files in the bundle)")
            return None
        try:
            spec = self._parse(job_file.read_bytes(), entry.base_dir)
        except InvalidJob as e:
            incomplete = [err for err in e.errors if err.code in INCOMPLETE_CODES]
            # checksums naming a file that is not there yet are part of the same incompleteness
            follow_on = [err for err in e.errors if incomplete and err.field.startswith("checksums.")]
            if incomplete and len(incomplete) + len(follow_on) == len(e.errors):
                names = ", ".join(err.field for err in incomplete)
                wait(f"incomplete upload: waiting for {names}", code="incomplete", fld=incomplete[0].field)
                return None
            if not quiet:
                wait("upload in progress (job file changing)")
                return None
            raise JobRejected(e.code, str(e), field=e.field) from e
        if spec.checksums:
            bad = [
                name for name, digest in spec.checksums if self._hash(track, entry.base_dir / name) != digest
            ]
            if bad:
                wait(
                    f"incomplete upload: checksum mismatch for {', '.join(bad)}",
                    code="checksum_mismatch",
                    fld=bad[0],
                )
                return None
        elif not quiet:
            wait(f"settling: files changed {now - track.sig_since:.0f} s ago (settle_s = {s.settle_s:g})")
            return None
        if self.model_min_audio_s is None:
            self.ledger.set_waiting_reason(row.id, "waiting for the model to load")
            return None
        if track.probed_sig != sig:
            # Decoding a long video takes a while: probes run in a background thread so the main
            # loop keeps serving (progress, dispatch, watchdog); the result is picked up by a
            # later scan, and only if the files are still the ones probed.
            if track.probe is None or track.probe_sig != sig:
                if track.probe is not None:
                    track.probe.cancel()
                self.ledger.set_waiting_reason(row.id, "checking media")
                track.probe_sig = sig
                track.probe = self._probes.submit(
                    _probe_all, entry.base_dir, spec, max(s.min_audio_s, self.model_min_audio_s)
                )
                track.probe.add_done_callback(lambda _: self.wake_later())
                return None
            if not track.probe.done():
                return None
            probe, track.probe = track.probe, None
            probe.result()  # raises JobRejected for bad media
            track.probed_sig = sig
        return Ready(entry=entry, row=row, spec=spec)

    def _parse(self, raw: bytes, base_dir: Path) -> JobSpec:
        spec = parse_job(raw, base_dir=base_dir, defaults=self.settings.job_defaults())
        if spec.seed_drawn and self.settings.defaults.seed is not None:
            spec = spec.with_seed(self.settings.defaults.seed)
        return spec

    def _hash(self, track: _Track, path: Path) -> str | None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in track.hashes:
            track.hashes[key] = sha256_file(path)
        return track.hashes[key]

    def _entry_files(self, entry: inbox_mod.Entry) -> list[Path]:
        if entry.kind == "bundle":
            return inbox_mod.bundle_files(entry.path)
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
            except JobRejected as rejected:
                self._reject_claimed(item.row, rejected)
            except OSError as e:  # the rename failed (permissions, vanished file): retried next scan
                logger.warning("job %s (%s): cannot take it yet: %s", item.row.id, item.row.name, e)
                self.ledger.set_waiting_reason(item.row.id, f"cannot take the upload: {e.strerror or e}")

    def claim(self, item: Ready) -> JobRow | None:
        """Move the inputs into the state dir, hash them, check for a duplicate, queue the job.

        The job dir is recorded in the ledger before anything moves (the intent), so a daemon
        killed halfway finishes the claim at its next scan (`resume_claims`).
        """
        row, entry = item.row, item.entry
        job_dir = self.settings.jobs_dir / row.id
        input_dir = job_dir / "input"
        self.ledger.set_columns(row.id, job_dir=str(job_dir))
        job_dir.mkdir(parents=True, exist_ok=True)
        if entry.kind == "bundle":
            if input_dir.is_dir():  # copied here across filesystems before a crash: that copy is complete
                shutil.rmtree(entry.path)
            else:
                move(entry.path, input_dir)
        else:
            input_dir.mkdir(exist_ok=True)
            move(entry.job_file, input_dir / inbox_mod.BUNDLE_JOB_FILE)
            self._move_loose_media(entry.source, input_dir, item.spec.media_files)
        self._tracks.pop(entry.source, None)
        return self._complete_claim(row, input_dir)

    def _move_loose_media(self, source: str, input_dir: Path, media: tuple[str, ...] | set[str]) -> None:
        shared = self._shared_loose_media(source)
        for rel in sorted(media):
            target = input_dir / rel
            src = self.settings.inbox / rel
            if target.exists() or not inbox_mod.plain_file_in(self.settings.inbox, rel):
                continue  # gone, or reached through a symlink: never taken from outside the inbox
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel in shared:
                shutil.copy2(src, target)
            else:
                move(src, target)
        inbox_mod.prune_emptied(self.settings.inbox, media)

    def _complete_claim(self, row: JobRow, input_dir: Path) -> JobRow | None:
        try:
            spec = self._parse((input_dir / inbox_mod.BUNDLE_JOB_FILE).read_bytes(), input_dir)
        except (InvalidJob, OSError) as e:
            code, fld = (e.code, e.field) if isinstance(e, InvalidJob) else ("missing_file", "job.json")
            raise JobRejected(code, f"the job changed while it was taken: {e}", field=fld) from e
        for rel in spec.media_files:
            _unshare(input_dir / rel)
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
        if original is not None and original.id != row.id:
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
        )
        admitted = self.ledger.admit(row.id, max_queued=self.settings.max_queued)
        if admitted is None:
            self.ledger.set_waiting_reason(row.id, f"queue full ({self.settings.max_queued} queued)")
        else:
            logger.info("job %s (%s) queued, seed %d", row.id, row.name, spec.seed)
        return admitted

    def resume_claims(self, waiting: dict[str, JobRow], present: set[str]) -> None:
        """Finish claims a killed daemon left halfway (job dir recorded, spec not yet stored)."""
        for source, row in waiting.items():
            if not row.job_dir or row.spec_json or row.error_code or source in present:
                continue
            input_dir = Path(row.job_dir) / "input"
            if not (input_dir / inbox_mod.BUNDLE_JOB_FILE).is_file():
                continue
            logger.info("job %s (%s): finishing a claim interrupted by a restart", row.id, row.name)
            try:
                if Path(source).suffix.lower() == ".json":  # a loose job: its media may still be in the inbox
                    self._move_loose_media(
                        source, input_dir, inbox_mod.loose_media_names(input_dir / inbox_mod.BUNDLE_JOB_FILE)
                    )
                self._complete_claim(row, input_dir)
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
        self._record_rejection(row, rejected)
        self._keep_inbox_originals(entry.path, row.source, Path(self._originals(row.id)))
        self._finish_rejection(row.id)

    def _reject_claimed(self, row: JobRow, rejected: JobRejected) -> None:
        self._record_rejection(row, rejected)
        input_dir = self.settings.jobs_dir / row.id / "input"
        kept = Path(self._originals(row.id))
        if input_dir.exists():
            _clear_empty(kept)
            move(input_dir, kept)
            restore_loose_job_name(kept, row.name, row.source)
        self._finish_rejection(row.id)

    def _originals(self, job_id: str) -> str:
        return str(self.ledger.get(job_id).originals or "")

    def _record_rejection(self, row: JobRow, rejected: JobRejected) -> None:
        """The intent, before any file moves: error fields, the error JSON path, the originals dir."""
        kept = self.outbox.keep_originals(row.name, [])  # reserves failed/<name>[-n]/
        error_path = self.outbox.root / f"{self.outbox.reserve_base(row.name)}.error.json"
        self.ledger.set_columns(
            row.id,
            error_code=rejected.code,
            error_message=rejected.message,
            error_field=rejected.field or None,
            duplicate_of=rejected.duplicate_of,
            output_json=str(error_path),
            originals=str(kept),
        )

    def _keep_inbox_originals(self, src: Path, source: str, kept: Path) -> None:
        """Move an inbox entry (`src`, ledger source `source`) and its loose media into `kept`."""
        if src.is_dir() and not src.is_symlink():
            _clear_empty(kept)
            move(src, kept)
            return
        kept.mkdir(parents=True, exist_ok=True)
        if src.exists() or src.is_symlink():
            media = inbox_mod.loose_media_names(src)
            shared = self._shared_loose_media(source)
            move(src, kept / src.name)
            for rel in sorted(media):
                path = self.settings.inbox / rel
                if inbox_mod.plain_file_in(self.settings.inbox, rel):  # never through a symlink
                    target = kept / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if rel in shared:
                        shutil.copy2(path, target)
                    else:
                        move(path, target)
            inbox_mod.prune_emptied(self.settings.inbox, media)

    def _finish_rejection(self, job_id: str) -> None:
        row = self.ledger.get(job_id)
        error_path = Path(str(row.output_json))
        if not error_path.exists():
            self.outbox.write_error_at(
                error_path,
                error_payload(
                    job_id=row.id,
                    name=row.name,
                    state="rejected",
                    code=str(row.error_code),
                    message=str(row.error_message),
                    field=row.error_field,
                    originals=Path(str(row.originals)),
                    duplicate_of=row.duplicate_of,
                ),
            )
        self.ledger.transition(row.id, "waiting", "rejected", finished_at=time.time(), waiting_reason=None)
        logger.warning("job %s (%s) rejected: %s: %s", row.id, row.name, row.error_code, row.error_message)

    def finish_rejections(self, waiting: dict[str, JobRow]) -> None:
        """Finish rejections a killed daemon left halfway (intent recorded, job still waiting)."""
        for row in waiting.values():
            if not (row.error_code and row.output_json and row.originals):
                continue
            kept = Path(row.originals)
            claimed_input = Path(row.job_dir) / "input" if row.job_dir else None
            if claimed_input is not None and claimed_input.exists():
                _clear_empty(kept)
                move(claimed_input, kept)
            else:
                self._keep_inbox_originals(Path(row.source), row.source, kept)
            self._finish_rejection(row.id)


def _clear_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _unshare(path: Path) -> None:
    """A claimed file that is also a hard link elsewhere (e.g. outside the inbox) becomes a copy of
    its own, so that other name can no longer change the job's input after the claim."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink <= 1:
        return
    tmp = path.with_name(f".{path.name}.unshare")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def model_min_audio_s(weights_dir: Path) -> float | None:
    """The shortest speech (s) the model in `weights_dir` renders: one chunk of frames plus one,
    at 25 fps (the reference needs more audio frames than one chunk has). None if unknown yet."""
    tiny = weights_dir / "tiny.json"
    if tiny.is_file():
        try:
            frame_num = int(json.loads(tiny.read_text())["generation"]["frame_num"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (frame_num + 1) / FPS
    if (weights_dir / "Wan2.1-I2V-14B-480P" / "config.json").is_file():
        return (FULL_FRAME_NUM + 1) / FPS
    return None


def _move_into(src: Path, dest: Path) -> Path:
    move(src, dest)
    return dest


def error_payload(
    *,
    job_id: str,
    name: str,
    state: str,
    code: str,
    message: str,
    field: str | None,
    originals: Path | None,
    duplicate_of: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The body of `<name>.error.json`."""
    payload: dict[str, Any] = {
        "job_id": job_id,
        "name": name,
        "state": state,
        "code": code,
        "message": message,
        "field": field or None,
        "originals": str(originals) if originals else None,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if duplicate_of:
        payload["duplicate_of"] = duplicate_of
    payload.update(extra)
    return payload


def dedupe_key(spec: JobSpec, hashes: dict[str, str]) -> str:
    """Same media content (by role) and same settings give the same key; a drawn seed is ignored."""
    settings = spec.to_dict()
    for key in ("cond_video", "cond_audio", "checksums", "priority", "seed_drawn"):
        settings.pop(key, None)
    if spec.seed_drawn:
        settings.pop("seed", None)
    if not spec.use_apg:  # APG off: the key a version without the APG settings gave the same job
        for key in ("use_apg", "apg_momentum", "apg_norm_threshold"):
            settings.pop(key, None)
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


def _probe_all(base_dir: Path, spec: JobSpec, min_audio_s: float) -> None:
    """Each file in its role: the reference's picture (image or video stream), then each speaker's
    sound (an audio file's, or a video's audio stream: the same MP4 may be both)."""
    probe_media(base_dir / spec.cond_video, rel=spec.cond_video, field="cond_video", min_audio_s=min_audio_s)
    for person, rel in spec.cond_audio:
        if rel != SILENT:
            probe_media(
                base_dir / rel, rel=rel, field=f"cond_audio.{person}", min_audio_s=min_audio_s, speech=True
            )


def probe_media(path: Path, *, rel: str, field: str, min_audio_s: float, speech: bool = False) -> None:
    """Decode a media file to the end; raise `JobRejected` naming the file if it cannot be.
    `speech`: the file's audio stream is what counts (an audio file, or a video with sound)."""
    suffix = path.suffix.lower()
    from daemon.jobs import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS

    try:
        if suffix in IMAGE_EXTENSIONS and not speech:
            _probe_image(path)
        elif speech or suffix in AUDIO_EXTENSIONS:
            if suffix == ".wav":
                _check_wav_length(path)
            duration = _probe_stream(path, "audio")
            if duration < min_audio_s:
                raise JobRejected(
                    "audio_too_short",
                    f"{field}: {rel} holds {duration:.2f} s of audio; at least {min_audio_s:g} s are needed",
                    field=field,
                )
        else:
            _probe_stream(path, "video")
    except JobRejected:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        raise JobRejected(
            "bad_media", f"{field}: {rel} cannot be decoded: {type(e).__name__}: {e}", field=field
        ) from e


def _check_wav_length(path: Path) -> None:
    """Refuse a WAV whose data chunk declares more bytes than the file holds: a truncated upload
    (e.g. a killed `rsync --partial`). FFmpeg clamps such a duration to the file size and decodes
    the rest without complaint, so the decode alone does not notice."""
    size = path.stat().st_size
    with open(path, "rb") as f:
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


def _probe_image(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.width < 2 or img.height < 2:
            raise ValueError(f"image is {img.width}x{img.height} pixels")


def _probe_stream(path: Path, kind: str) -> float:
    """Decode every frame of the first `kind` stream; returns its duration in seconds."""
    import av

    with av.open(str(path), metadata_errors="ignore") as container:
        streams = container.streams.audio if kind == "audio" else container.streams.video
        if not streams:
            raise ValueError(f"no {kind} stream")
        stream = streams[0]
        end = 0.0
        count = 0
        for frame in container.decode(stream):
            count += 1
            if isinstance(frame, av.AudioFrame):
                length = frame.samples / float(frame.sample_rate or 1)
                end = end + length if frame.time is None else max(end, frame.time + length)
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
