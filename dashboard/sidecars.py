"""The few facts of a finished job's sidecar (`<name>.json` in the outbox) that the tiles show:
the real output resolution, fps, whether the tiny random-weight model made it, and the
per-stage timings. Read only for the jobs on the page, only from inside the outbox, and cached
by (path, size, mtime) so a page of 48 tiles costs 48 `stat` calls once warm.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 20  #: a sidecar larger than this is not read (it is not one of ours)
_CACHE_SIZE = 4096


class Sidecars:
    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox.resolve()
        self._cache: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
        self._guard = threading.Lock()

    def path_of(self, row: dict[str, Any]) -> Path | None:
        """The job's sidecar (or error JSON) path from the ledger, if it lies inside the outbox."""
        raw = row.get("output_json")
        if not raw or row.get("deleted_at"):
            return None
        path = Path(str(raw)).resolve()
        return path if path.is_relative_to(self.outbox) else None

    def read(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The whole sidecar as JSON, or None when it is missing, too large or not JSON."""
        path = self.path_of(row)
        if path is None:
            return None
        try:
            st = os.stat(path)
            if st.st_size > MAX_BYTES or not path.is_file():
                return None
            key = (str(path), st.st_size, st.st_mtime_ns)
            with self._guard:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
            value = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict):
            return None
        with self._guard:
            self._cache[key] = value
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    def facts(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """{width, height, fps, tiny, timings_s, gpu, device} of a done job, or None."""
        if row.get("state") != "done":
            return None
        side = self.read(row)
        if side is None:
            return None
        raw = side.get("model")
        model: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return {
            "width": side.get("width"),
            "height": side.get("height"),
            "fps": side.get("fps"),
            "tiny": bool(model.get("tiny")),
            "timings_s": side.get("timings_s") if isinstance(side.get("timings_s"), dict) else None,
            "gpu": side.get("gpu"),
            "device": model.get("device"),
        }
