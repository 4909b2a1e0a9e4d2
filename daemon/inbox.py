"""The inbox folder: what counts as a job entry, what is an upload in progress, and a watcher.

Filesystem events are only hints: the watcher sets a `threading.Event` and the daemon then scans
the whole folder (`scan`). The daemon also scans at start, every `rescan_s`, and at once when
watchdog reports an inotify queue overflow (events were lost and it tells the handler nothing
else; the only trace is a log record, which `OverflowHook` turns into a wake-up).

Two job forms:
- bundle: `inbox/<name>/job.json` plus the media it names (subfolders allowed);
- loose: `inbox/<name>.json` with its media beside it: loose files at the top of the inbox, or
  files in a plain *media folder* (`examples/single/1.wav`, as in the reference's example JSON
  files): a folder without `job.json`, reached without a hidden or temporary name or a symbolic
  link on the way (`loose_path_problem`). A folder with `job.json` is a bundle, never a media
  folder, and a dot-folder is an upload being staged: a loose path into either is rejected.
  While a loose job of the inbox names files in a folder without `job.json`, that folder is no
  job candidate (`is_media_folder`); its files are copied at the claim, never moved, so a bundle
  whose `job.json` has not arrived yet is never damaged.

Nothing here opens a file that is not a regular one (a FIFO named `x.json` must not block the
daemon: `daemon.jobs.open_regular`), and a bundle's tree is walked without recursion and within
bounds (`walk_bundle`: at most MAX_FOLDER_DEPTH folders deep and MAX_BUNDLE_ENTRIES entries).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.jobs import MAX_FOLDER_DEPTH, SILENT, json_too_deep, normalise_media_path, read_regular

logger = logging.getLogger(__name__)

BUNDLE_JOB_FILE = "job.json"
#: names (not paths) of uploads in progress and OS litter (`LITTER_PATTERNS`); never taken as jobs
TEMP_PATTERNS = (
    ".*",  # dot-files: rsync's .name.XXXXXX, .rsync-partial/, .~tmp~/, .DS_Store, ._*, .nfs*, .syncthing.*
    "*.part",
    "*.partial",
    "*.filepart",
    "*.tmp",
    "*.crdownload",
    "*.swp",
    "*~",
    "~syncthing~*",
    "~$*",
    "Thumbs.db",
    "ehthumbs.db",
    "desktop.ini",
)
#: OS metadata files (Finder, Explorer), made and remade at will and never job content: ignored,
#: and never a sign of an upload in progress
OS_LITTER_PATTERNS = (".DS_Store", "._*", "Thumbs.db", "ehthumbs.db", "desktop.ini")
#: litter among TEMP_PATTERNS: never taken as jobs, but never an upload in progress either, so it
#: does not keep a bundle waiting (editors' and `rsync --backup`'s `name~` copies included)
LITTER_PATTERNS = (*OS_LITTER_PATTERNS, "[!.]*~")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def is_temporary(name: str) -> bool:
    """True for names that upload tools use while a transfer is in progress (and OS litter)."""
    return _matches(name, TEMP_PATTERNS)


def is_litter(name: str) -> bool:
    """True for OS and editor litter (`.DS_Store`, `._*`, `Thumbs.db`, `desktop.ini`, `face.png~`):
    never a job, and no sign of an upload in progress."""
    return _matches(name, LITTER_PATTERNS)


def is_os_litter(name: str) -> bool:
    """True for OS metadata files (`.DS_Store`, `._*`, `Thumbs.db`, `desktop.ini`)."""
    return _matches(name, OS_LITTER_PATTERNS)


def path_has_temporary_part(rel: str) -> bool:
    return any(is_temporary(part) for part in Path(rel).parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One job candidate in the inbox."""

    kind: str  # "bundle" | "loose"
    name: str  # bundle dir name or loose json stem: the output base name
    path: Path  # the bundle directory or the loose json file
    job_file: Path  # bundle/job.json or the loose json itself
    base_dir: Path  # where the job's media paths are relative to
    media: frozenset[str] = frozenset()  # loose: the media paths its JSON names (`loose_media_names`)

    @property
    def source(self) -> str:
        return storable(str(self.path))


#: longest output base name, in UTF-8 bytes: "<name>-NN.error.json" must fit NAME_MAX (255)
MAX_NAME_BYTES = 200


def output_name(name: str) -> str:
    """The job's name for the ledger and the outbox: storable, cut to MAX_NAME_BYTES."""
    raw = storable(name).encode("utf-8")
    return raw[:MAX_NAME_BYTES].decode("utf-8", "ignore") if len(raw) > MAX_NAME_BYTES else storable(name)


def storable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name written as `\\xNN` (the ledger stores UTF-8
    only; a Latin-1 name made by an old client must not crash the daemon). UTF-8 names: as is."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan(inbox: Path) -> list[Entry]:
    """Every job candidate in `inbox`, in name order. Temporary names, OS litter, non-job files
    and the media folders of loose jobs (`is_media_folder`) are skipped."""
    try:
        names = sorted(os.listdir(inbox))
    except FileNotFoundError:
        return []
    found = [entry for name in names if not is_temporary(name) and (entry := _entry(inbox, name))]
    named = media_folder_names(found)
    return [entry for entry in found if not is_media_folder(entry, named)]


def _entry(inbox: Path, name: str) -> Entry | None:
    """The job candidate `inbox/<name>` is, or None (not a folder nor a `.json`, or gone)."""
    path = inbox / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    is_json = name.lower().endswith(".json")
    if stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and not is_json and os.path.isdir(path)):
        # a symlinked bundle is an entry too, so intake rejects it with a reason (never follows it)
        return Entry(
            kind="bundle", name=output_name(name), path=path, job_file=path / BUNDLE_JOB_FILE, base_dir=path
        )
    if is_json and (len(name) > 5 or stat.S_ISLNK(st.st_mode)):
        return Entry(
            kind="loose",
            name=output_name(name[:-5]),
            path=path,
            job_file=path,
            base_dir=inbox,
            media=frozenset(loose_media_names(path)),
        )
    return None


def media_folder_names(entries: Iterable[Entry]) -> set[str]:
    """The top-level folders the loose entries name media in (`examples` for
    `examples/single/1.wav`)."""
    return {rel.split("/", 1)[0] for e in entries if e.kind == "loose" for rel in e.media if "/" in rel}


def is_media_folder(entry: Entry, named: set[str]) -> bool:
    """True for a folder that holds loose jobs' media rather than being a job: a real folder
    without `job.json` in which a loose job of the inbox names a file (`named`, from
    `media_folder_names`). A folder with `job.json` is always a bundle; one without it that no
    loose job names is a bundle still being uploaded."""
    return (
        entry.kind == "bundle"
        and entry.path.name in named
        and not entry.path.is_symlink()
        and not os.path.lexists(entry.job_file)
    )


def loose_path_problem(inbox: Path, rel: str) -> str | None:
    """Why a loose job of `inbox` may not take the media path `rel` (normalised, relative), or
    None: a hidden or temporary name anywhere on it (an upload in progress, a staged dot-folder),
    or a file inside a bundle (a top-level folder holding `job.json`: another client's job).
    Symbolic links and non-regular files are `daemon.jobs.check_media_path`'s to refuse."""
    parts = rel.split("/")
    hidden = next((part for part in parts if is_temporary(part)), None)
    if hidden is not None:
        return f"passes through the hidden or temporary name {hidden!r} (an upload in progress)"
    if len(parts) > 1 and os.path.lexists(inbox / parts[0] / BUNDLE_JOB_FILE):
        return f"is inside the bundle {parts[0]!r} (a folder with {BUNDLE_JOB_FILE}: another job)"
    return None


#: the largest loose JSON `loose_media_names` reads
_LOOSE_JSON_MAX_BYTES = 1 << 20


def loose_media_names(job_file: Path) -> set[str]:
    """Best-effort: the media a loose JSON names (normalised, inside the inbox, no hidden or
    temporary name on the way), for claims and for telling its media folders from bundles.
    Unreadable, non-regular (a FIFO), too deeply nested or invalid JSON names none."""
    try:
        raw = read_regular(job_file, max_bytes=_LOOSE_JSON_MAX_BYTES)  # no symlink, never blocks
        text = raw.decode("utf-8-sig")
        if json_too_deep(text):
            return set()
        doc = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return set()
    if not isinstance(doc, dict):
        return set()
    raw_names: list[Any] = [doc.get("cond_video")]
    audio = doc.get("cond_audio")
    if isinstance(audio, dict):
        raw_names += list(audio.values())
    names = set()
    for value in raw_names:
        if not isinstance(value, str) or value == SILENT or "\0" in value:
            continue
        rel = normalise_media_path(value)
        if rel and not any(is_temporary(part) for part in rel.split("/")):
            names.add(rel)
    return names


def plain_file_in(root: Path, rel: str) -> bool:
    """True if `root/rel` is a regular file reached without passing through a symbolic link (no
    folder on the way and not the file itself): moving it can never take a file from outside."""
    parts = PurePosixPath(rel).parts
    if not parts or ".." in parts or PurePosixPath(rel).is_absolute():
        return False
    path = root
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return False
        if stat.S_ISLNK(mode):
            return False
    return stat.S_ISREG(mode)


#: most entries (files and folders) a bundle may hold
MAX_BUNDLE_ENTRIES = 10_000


class BadBundle(ValueError):
    """A bundle whose tree is too deep or too large to take: `code` for the error JSON."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class BundleTree:
    """What `walk_bundle` found: regular files, temporary names (uploads in progress) and the
    entries that are neither files nor folders (FIFOs, sockets, devices, symbolic links)."""

    files: tuple[Path, ...]
    uploading: tuple[str, ...]
    special: tuple[str, ...]


def walk_bundle(bundle: Path) -> BundleTree:
    """The bundle's tree, walked without recursion and without following symbolic links; raises
    `BadBundle` (`too_deep`, `too_large`) past MAX_FOLDER_DEPTH folders or MAX_BUNDLE_ENTRIES
    entries, so a hostile tree can neither crash nor stall the daemon."""
    files: list[Path] = []
    uploading: list[str] = []
    special: list[str] = []
    seen = 0
    stack: list[tuple[Path, int]] = [(bundle, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        seen += len(entries)
        if seen > MAX_BUNDLE_ENTRIES:
            raise BadBundle("too_large", f"the bundle holds more than {MAX_BUNDLE_ENTRIES} files and folders")
        subdirs = []
        for entry in entries:
            rel = os.path.relpath(entry.path, bundle)
            temporary = is_temporary(entry.name)
            if temporary and not is_litter(entry.name):
                uploading.append(rel)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode):
                if depth + 1 >= MAX_FOLDER_DEPTH:
                    raise BadBundle(
                        "too_deep",
                        f"the bundle nests folders more than {MAX_FOLDER_DEPTH} levels deep ({rel[:80]}...)",
                    )
                if not temporary:
                    subdirs.append((Path(entry.path), depth + 1))
            elif stat.S_ISREG(mode):
                if not temporary:
                    files.append(Path(entry.path))
            elif not temporary:
                special.append(rel)
        stack.extend(reversed(subdirs))
    return BundleTree(files=tuple(files), uploading=tuple(uploading), special=tuple(special))


def bundle_files(bundle: Path) -> list[Path]:
    """Every non-temporary regular file under a bundle (`walk_bundle`)."""
    return list(walk_bundle(bundle).files)


def has_temporary_files(bundle: Path) -> bool:
    """True while an upload tool still has temporary files (e.g. rsync's `.name.XXXXXX`) in a
    bundle. OS and editor litter (`is_litter`: `.DS_Store`, `Thumbs.db`, `face.png~`) is not one."""
    return bool(walk_bundle(bundle).uploading)


def signature(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of each path that exists: equal signatures mean nothing changed."""
    sig = []
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            sig.append((str(p), -1, 0))
            continue
        sig.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sig)


class OverflowHook(logging.Handler):
    """Sets `wake` when watchdog logs that the inotify queue overflowed (events were dropped)."""

    def __init__(self, wake: threading.Event, overflowed: threading.Event) -> None:
        super().__init__(level=logging.WARNING)
        self.wake = wake
        self.overflowed = overflowed

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.overflowed.set()
            self.wake.set()


class Watcher:
    """A watchdog observer on the inbox whose only action is `wake.set()`."""

    def __init__(self, inbox: Path, wake: threading.Event, *, polling: bool = False) -> None:
        self.inbox = inbox
        self.wake = wake
        self.overflowed = threading.Event()
        self.polling = polling
        self._observer: Any = None
        self._hook = OverflowHook(wake, self.overflowed)

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        wake = self.wake

        class _Hint(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                # reads change nothing: the daemon's own reads of the inbox must not wake a rescan
                if event.event_type not in ("opened", "closed_no_write"):
                    wake.set()

        logging.getLogger("watchdog").addHandler(self._hook)
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = PollingObserver(timeout=2.0) if self.polling else Observer()
        observer.schedule(_Hint(), str(self.inbox), recursive=True)
        observer.daemon = True
        try:
            observer.start()
        except OSError as e:  # e.g. inotify watch limit reached: the rescan still finds everything
            logger.warning("inbox watcher could not start (%s); relying on the periodic rescan", e)
            return
        self._observer = observer

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def restart(self) -> None:
        """Start again, e.g. after the inbox folder was removed and recreated."""
        self.stop()
        self.start()

    def stop(self) -> None:
        logging.getLogger("watchdog").removeHandler(self._hook)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
