"""A wall clock that the tests can step, for a real daemon process (test-only).

On PYTHONPATH with `$INFINITETALK_TEST_WALL_OFFSET_FILE` set, `time.time()` and `time.time_ns()`
return the real wall clock plus the number of seconds written in that file (read again at most
every 50 ms), as after `date -s`; `time.monotonic()` is left alone, as the kernel leaves it.
libfaketime would do the same from outside, but its `FAKETIME_DONT_FAKE_MONOTONIC` mode breaks
Python's `time.sleep` (EINVAL from clock_nanosleep) in the packaged 0.9.10.
"""

import os
import time

_PATH = os.environ.get("INFINITETALK_TEST_WALL_OFFSET_FILE")

if _PATH:
    _real_time, _real_time_ns, _monotonic = time.time, time.time_ns, time.monotonic
    _cache = [0.0, -1.0]  # offset, monotonic time it was read

    def _offset() -> float:
        now = _monotonic()
        if now - _cache[1] > 0.05:
            try:
                with open(_PATH) as f:
                    _cache[0] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
            _cache[1] = now
        return _cache[0]

    def _time() -> float:
        return _real_time() + _offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    time.time = _time
    time.time_ns = _time_ns
