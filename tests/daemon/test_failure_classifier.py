"""`daemon.policy.classify`: the map from the exception a render raised to its error code, whether
another attempt may succeed, and whether the worker process must be replaced. Real exceptions
(torch's, the OS's, SQLite's, the process group's), one row each; until now only the
FakePipeline's prompt words reached it, end to end through a daemon."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from collections.abc import Callable

import pytest
import torch

from daemon.errors import ERROR_CODES
from daemon.policy import Failure, InputChanged, classify
from pipeline.tts_text import TtsUnavailable


def _sqlite_full() -> sqlite3.Error:
    """SQLite's own SQLITE_FULL, from a database capped at two pages."""
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA max_page_count = 2")
    db.execute("CREATE TABLE t (b BLOB)")
    try:
        for _ in range(10):
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 4096,))
    except sqlite3.Error as e:
        return e
    finally:
        db.close()
    raise AssertionError("the capped database never filled")


def _raised_from(cause: BaseException) -> RuntimeError:
    """A RuntimeError raised while handling `cause` (`raise ... from`), as the pipeline wraps."""
    try:
        raise RuntimeError("writing the chunk failed") from cause
    except RuntimeError as e:
        return e


def _group_broken() -> BaseException:
    from pipeline.parallel_pipeline import GroupBroken

    return GroupBroken("rank 1 stopped answering")


OOM = Failure(code="cuda_oom", transient=True)
DISK_FULL = Failure(code="disk_full", transient=True)
CUDA_ERROR = Failure(code="cuda_error", transient=True, poisons_worker=True)
BAD_INPUT = Failure(code="bad_input", transient=False)
RENDER_ERROR = Failure(code="render_error", transient=False)

CASES: list[tuple[str, Callable[[], BaseException], Failure]] = [
    ("torch-oom", lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OOM),
    ("oom-as-runtime-error", lambda: RuntimeError("CUDA out of memory. Tried to allocate 20 MiB"), OOM),
    ("oom-text-beats-the-type", lambda: ValueError("CUDA out of memory while padding"), OOM),
    ("enospc", lambda: OSError(errno.ENOSPC, "No space left on device"), DISK_FULL),
    ("edquot", lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), DISK_FULL),
    (
        "shutil-error",
        lambda: shutil.Error([("a.wav", "b.wav", "[Errno 28] No space left on device")]),
        DISK_FULL,
    ),
    ("sqlite-full", _sqlite_full, DISK_FULL),
    ("chained-disk-full", lambda: _raised_from(OSError(errno.ENOSPC, "No space left on device")), DISK_FULL),
    (
        "cuda-error-text",
        lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
        CUDA_ERROR,
    ),
    ("accelerator-error", lambda: torch.AcceleratorError("device-side assert triggered"), CUDA_ERROR),
    (
        "group-broken",
        _group_broken,
        Failure(code="worker_group_broken", transient=True, poisons_worker=True),
    ),
    (
        "input-changed",
        lambda: InputChanged("voice.WAV changed since the claim"),
        Failure(code="input_changed", transient=False),
    ),
    (
        "tts-unavailable",
        lambda: TtsUnavailable("text-to-speech needs the Python modules kokoro: pip install -e '.[tts]'"),
        Failure(code="tts_unavailable", transient=False),
    ),
    ("value-error", lambda: ValueError("size 'infinitetalk-1080' is not a bucket"), BAD_INPUT),
    ("file-not-found", lambda: FileNotFoundError(errno.ENOENT, "No such file", "face.png"), BAD_INPUT),
    ("key-error", lambda: KeyError("person2"), BAD_INPUT),
    ("other-os-error", lambda: OSError(errno.EIO, "Input/output error"), RENDER_ERROR),
    ("plain-runtime-error", lambda: RuntimeError("shape mismatch in block 3"), RENDER_ERROR),
    ("chained-non-disk", lambda: _raised_from(ValueError("bad bbox")), RENDER_ERROR),
    ("zero-division", lambda: ZeroDivisionError("division by zero"), RENDER_ERROR),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify(make: Callable[[], BaseException], expected: Failure) -> None:
    exc = make()
    assert classify(exc) == expected, (type(exc).__name__, str(exc))
    assert expected.code in ERROR_CODES


def test_every_code_classify_returns_has_a_row() -> None:
    """The table covers each outcome (a new code in classify needs a row here)."""
    import ast
    import inspect

    import daemon.policy

    tree = ast.parse(inspect.getsource(daemon.policy.classify))
    returned = {
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Failure"
        for kw in node.keywords
        if kw.arg == "code" and isinstance(kw.value, ast.Constant)
    }
    assert returned == {c[2].code for c in CASES}
