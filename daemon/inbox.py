"""The inbox folder: what counts as a job entry, what is an upload in progress, and a watcher.

Filesystem events are only hints: the watcher sets a `threading.Event` and the daemon then scans
the whole folder (`scan`). The daemon also scans at start, every `rescan_s`, and at once when
watchdog reports an inotify queue overflow (events were lost and it tells the handler nothing
else; the only trace is a log record, which `OverflowHook` turns into a wake-up).

Two job forms:
- bundle: `inbox/<name>/job.json` plus the media it names;
- loose: `inbox/<name>.json` with its media beside it in the inbox.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUNDLE_JOB_FILE = "job.json"
#: names (not paths) of uploads in progress and OS litter; never taken as jobs or job files
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
    "desktop.ini",
)
#: folders the daemon itself may create inside the inbox; never jobs
RESERVED_NAMES = frozenset({"failed"})


def is_temporary(name: str) -> bool:
    """True for names that upload tools use while a transfer is in progress (and OS litter)."""
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in TEMP_PATTERNS)


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
    """Every job candidate in `inbox`, in name order. Temporary names and non-job files are skipped."""
    entries: list[Entry] = []
    try:
        names = sorted(os.listdir(inbox))
    except FileNotFoundError:
        return entries
    for name in names:
        if is_temporary(name) or name in RESERVED_NAMES:
            continue
        path = inbox / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            entries.append(
                Entry(
                    kind="bundle",
                    name=output_name(name),
                    path=path,
                    job_file=path / BUNDLE_JOB_FILE,
                    base_dir=path,
                )
            )
        elif (
            name.lower().endswith(".json")
            and len(name) > 5
            or stat.S_ISLNK(st.st_mode)
            and name.lower().endswith(".json")
        ):
            entries.append(
                Entry(kind="loose", name=output_name(name[:-5]), path=path, job_file=path, base_dir=inbox)
            )
        elif stat.S_ISLNK(st.st_mode) and os.path.isdir(path):
            # a symlinked bundle: an entry, so intake rejects it with a reason (never follows it)
            entries.append(
                Entry(
                    kind="bundle",
                    name=output_name(name),
                    path=path,
                    job_file=path / BUNDLE_JOB_FILE,
                    base_dir=path,
                )
            )
    return entries


def bundle_files(bundle: Path) -> list[Path]:
    """Every non-temporary file under a bundle (recursively, symlinks not followed)."""
    out: list[Path] = []
    for root, dirs, files in os.walk(bundle, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        out.extend(Path(root) / f for f in sorted(files) if not is_temporary(f))
    return out


def has_temporary_files(bundle: Path) -> bool:
    """True while an upload tool still has temporary files (e.g. rsync's `.name.XXXXXX`) in a bundle."""
    for _root, dirs, files in os.walk(bundle, followlinks=False):
        if any(
            is_temporary(n) and n not in (".DS_Store",) and not n.startswith("._") for n in (*dirs, *files)
        ):
            return True
    return False


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
