"""The outbox: results appear all at once or not at all, and nothing there is ever overwritten.

A render writes into `outbox/.partial/<job_id>/`; `stage_publication` picks free final names and
fsyncs each file, `commit_publication` hard-links them to their final names (`os.link` fails if
the name exists, so a taken name is never replaced), `finish_publication` removes the staging
copy. Order: `<name>.mp4`, `<name>.jpg`, then `<name>.json` last, so a client that waits for the
JSON sees a complete result.

All or nothing: if any link fails (ENOSPC, EDQUOT, EMLINK, EIO, any errno), the links already
made are removed again before the error is raised, so a failed publication leaves no orphan
`<name>.mp4` behind and a retry takes the same name. Every published file's identity (device,
inode, size, mtime, sha256; `identify`) is recorded in the ledger with the intent, so later
deletions (the `delete` command, retention, recovery) touch only files proven to be the job's
(`is_same_file`), never a newer job's file that took a name freed by hand.

A rejected or failed job gets `<name>.error.json` and its original files under
`outbox/failed/<name>/`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
FAILED_DIR = "failed"
#: every final name a job may take; a base name is free only if none of these exist
SUFFIXES = (".mp4", ".jpg", ".json", ".error.json")
STAGED_SIDECAR = "sidecar.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Published:
    base: str
    video: Path
    poster: Path | None
    sidecar: Path
    #: role (video, poster, sidecar) -> `identify()` of the staged file (the final name is a hard
    #: link to the same inode)
    identity: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def identity_json(self) -> str:
        return json.dumps(dict(self.identity), sort_keys=True)


def identify(path: Path) -> dict[str, Any]:
    """A file's identity: device, inode, size, mtime in ns and sha256 (read without following a
    symlink). Two files with the same identity are the same file with the same content."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest.hexdigest(),
    }


def is_same_file(path: Path, identity: Mapping[str, Any], *, check_hash: bool = True) -> bool:
    """True only if `path` (not followed if a symlink) is the file `identity` describes: same
    device, inode, size and mtime, and with `check_hash` the same sha256 too (an inode number freed
    by a removal is soon given to a new file; the content is the proof)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    recorded = (identity.get("dev"), identity.get("ino"), identity.get("size"), identity.get("mtime_ns"))
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != recorded:
        return False
    if not check_hash:
        return True
    try:
        return identify(path)["sha256"] == identity.get("sha256")
    except OSError:
        return False


def names_job(path: Path, job_id: str, *, listing: Path | None = None, max_bytes: int = 1 << 20) -> bool:
    """True if `path` is a JSON file (sidecar or error JSON, not a symlink) written for `job_id`;
    with `listing`, it must also name that file among its outputs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        raw = os.read(fd, max_bytes + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw) if len(raw) <= max_bytes else None
    except ValueError:
        return False
    if not isinstance(doc, dict) or doc.get("job_id") != job_id:
        return False
    if listing is None:
        return True
    outputs = doc.get("outputs")
    return isinstance(outputs, dict) and str(listing) in [str(v) for v in outputs.values() if v]


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems refuse fsync on directories; the data is already synced
        pass


def _candidates(name: str) -> Iterable[str]:
    yield name
    n = 2
    while True:
        yield f"{name}-{n}"
        n += 1


def _write_fsynced(path: Path, payload: Mapping[str, Any]) -> None:
    """Write `payload` as indented JSON to `path` (created or truncated) and fsync the file; the
    callers then link or rename it into place and fsync the folder."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(payload), f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write `path` via a temporary file in the same folder, fsync, rename (replaces)."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_fsynced(tmp, payload)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial = root / PARTIAL_DIR
        self.failed = root / FAILED_DIR

    def ensure(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(parents=True, exist_ok=True)

    def staging_dir(self, job_id: str) -> Path:
        path = self.partial / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clean_staging(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove staging folders of jobs not in `keep` (left by a crash); returns their ids."""
        kept = set(keep)
        removed = []
        if self.partial.is_dir():
            for child in self.partial.iterdir():
                if child.name not in kept:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(
                        missing_ok=True
                    )
                    removed.append(child.name)
        return removed

    def _free(self, base: str) -> bool:
        return not any((self.root / f"{base}{suffix}").exists() for suffix in SUFFIXES)

    def reserve_base(self, name: str, taken: AbstractSet[str] = frozenset()) -> str:
        """The first `<name>[-n]` none of whose final names exist (nor are in `taken`)."""
        for base in _candidates(name):
            if self._free(base) and base not in taken:
                return base
        raise AssertionError("unreachable")

    def stage_publication(
        self,
        *,
        job_id: str,
        name: str,
        video: Path,
        poster: Path | None,
        sidecar: Mapping[str, Any],
        taken: AbstractSet[str] = frozenset(),
    ) -> Published:
        """Phase 1 of publishing: pick the final names, write the sidecar into staging (fsync).

        Nothing is visible in the outbox yet. The caller records the returned paths (the intent)
        in the ledger, then calls `commit_publication`; after a crash in between, the same call
        completes the publication from what staging holds.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        base = self.reserve_base(name, taken)
        published = Published(
            base=base,
            video=self.root / f"{base}.mp4",
            poster=self.root / f"{base}.jpg" if poster is not None and poster.exists() else None,
            sidecar=self.root / f"{base}.json",
        )
        payload = {
            **sidecar,
            "outputs": {
                "video": str(published.video),
                "poster": str(published.poster) if published.poster else None,
            },
        }
        staged = video.parent / STAGED_SIDECAR
        _write_fsynced(staged, payload)
        fsync_path(video)
        identity = {"video": identify(video), "sidecar": identify(staged)}
        if published.poster is not None and poster is not None:
            fsync_path(poster)
            identity["poster"] = identify(poster)
        fsync_dir(video.parent)
        return replace(published, identity=identity)

    def _pairs(self, published: Published, staging: Path, job_id: str) -> list[tuple[Path, Path]]:
        """(staged file, final name) in publication order: video, poster, sidecar last."""
        pairs = [(staging / f"{job_id}.mp4", published.video)]
        if published.poster is not None:
            pairs.append((staging / f"{job_id}.jpg", published.poster))
        pairs.append((staging / STAGED_SIDECAR, published.sidecar))
        return pairs

    def commit_publication(self, published: Published, *, staging: Path, job_id: str) -> None:
        """Phase 2: hard-link video, poster, then the sidecar (last) to their final names.

        Idempotent: a name already linked to the staged file is left alone. A final name taken
        by a file that is not ours raises FileExistsError (nothing is ever overwritten). All or
        nothing: whatever fails (any errno, or an exception in between), every final name linked
        to a staged file is unlinked again before the error propagates.
        """
        pairs = self._pairs(published, staging, job_id)
        try:
            for src, dest in pairs:
                try:
                    os.link(src, dest)
                except FileExistsError:
                    if not _same(src, dest):
                        raise
            fsync_dir(self.root)
        except BaseException:
            self._unlink_ours(pairs)
            raise

    def undo_publication(self, published: Published, *, staging: Path, job_id: str) -> list[Path]:
        """Unlink every final name that is a link to this job's staged file; returns the names
        left behind (an unlink that failed). Names held by other files are never touched."""
        return self._unlink_ours(self._pairs(published, staging, job_id))

    def _unlink_ours(self, pairs: Iterable[tuple[Path, Path]]) -> list[Path]:
        left = []
        for src, dest in pairs:
            if not _same(src, dest):
                continue
            try:
                dest.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.error("could not take back %s after a failed publication: %s", dest, e)
                left.append(dest)
        if pairs:
            fsync_dir(self.root)
        return left

    def finish_publication(self, job_id: str) -> None:
        """After the ledger says done: drop the staging folder."""
        shutil.rmtree(self.partial / job_id, ignore_errors=True)

    def staged_sidecar(self, job_id: str) -> dict[str, Any] | None:
        path = self.partial / job_id / STAGED_SIDECAR
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def write_error_at(self, path: Path, payload: Mapping[str, Any]) -> Path:
        """Write an error JSON at an exact, reserved path (atomically; never replaces a file)."""
        self.partial.mkdir(parents=True, exist_ok=True)
        tmp = self.partial / f"error-{os.getpid()}-{time.time_ns()}.json"
        try:
            _write_fsynced(tmp, payload)
            os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        return path

    def keep_originals(self, name: str, items: Iterable[tuple[Path, str, bool]]) -> Path:
        """Put a failed job's original files under `failed/<name>[-n]/`.

        `items` are (source, relative destination, move?) triples: moved by rename, or copied
        when `move` is False (a loose media file another job in the inbox also uses).
        """
        self.failed.mkdir(parents=True, exist_ok=True)
        for base in _candidates(name):
            dest = self.failed / base
            try:
                dest.mkdir()
            except FileExistsError:
                continue
            break
        for src, rel, move in items:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if move:
                    _move(src, target)
                elif src.is_dir():
                    shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, target, follow_symlinks=False)
            except FileNotFoundError:
                logger.warning("original %s vanished before it could be kept", src)
        return dest


def _same(src: Path, dest: Path) -> bool:
    """`dest` is a hard link to `src` (both exist, same inode; symlinks never count)."""
    try:
        a, b = os.lstat(src), os.lstat(dest)
    except OSError:
        return False
    return stat.S_ISREG(b.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_if_same(path: Path, identity: Mapping[str, Any]) -> bool:
    """Unlink `path` only if it is still the recorded file (`is_same_file`, content checked)."""
    if not is_same_file(path, identity):
        return False
    path.unlink(missing_ok=True)
    return True


def restore_loose_job_name(kept: Path, name: str, source: str) -> None:
    """A claimed loose job's JSON was stored as `job.json`; among the originals kept under
    `outbox/failed/<name>/` it gets its own file name back (`<name>.json`, as it was dropped)."""
    original = Path(source).name
    if original != f"{name}.json" or original == "job.json":
        return  # a bundle: its job.json is its own name
    if (kept / "job.json").is_file() and not (kept / original).exists():
        os.rename(kept / "job.json", kept / original)


def _move(src: Path, dest: Path) -> None:
    """Rename; across filesystems, copy to a temporary sibling of `dest`, rename it into place,
    then delete `src`. Either way `dest` appears complete or not at all."""
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.copying")
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, tmp, symlinks=True)
            os.rename(tmp, dest)
            shutil.rmtree(src)
        else:
            shutil.copy2(src, tmp, follow_symlinks=False)
            os.rename(tmp, dest)
            src.unlink()


move = _move
