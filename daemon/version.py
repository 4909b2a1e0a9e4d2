"""The service's version: the installed package's, and the git commit when run from a checkout.

`infinitetalk --version` prints `infinitetalk-service 0.1.0 (git 1a2b3c4d5e6f)` (the commit only
from a git checkout with `git` on the PATH, `-dirty` when tracked files differ); every sidecar
records `{"service": {"version", "git_commit"}}`. Nothing here fails: no git, no checkout, a
broken repository or a slow one (2 s) give `git_commit: null`. Standard library only.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE = "infinitetalk-service"
ROOT = Path(__file__).resolve().parents[1]


def version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return _pyproject_version() or "unknown"


def _pyproject_version() -> str | None:
    import tomllib

    try:
        doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = doc.get("project", {}).get("version")
    return value if isinstance(value, str) else None


@functools.cache
def git_commit(root: Path = ROOT) -> str | None:
    """The checkout's commit (12 hex digits, `-dirty` with local changes), or None."""
    if not (root / ".git").exists():
        return None
    try:
        head = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if head and dirty else head or None


def _git(root: Path, *args: str) -> str:
    """What `git -C root ARGS` prints, stripped; raises if it fails or takes over 2 s."""
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=2, check=True
    )
    return done.stdout.strip()


def describe() -> dict[str, str | None]:
    """What a sidecar records: `{"version", "git_commit"}`."""
    return {"version": version(), "git_commit": git_commit()}


def version_line() -> str:
    commit = git_commit()
    return f"{PACKAGE} {version()}" + (f" (git {commit})" if commit else "")
