"""Which node rendered each chunk of a job: `chunk_nodes.json` in the job's state folder.

The Ray executor (daemon/ray_pool.py) records, for every chunk an actor starts, the actor's node
and the attempt; a chunk started again (a resumed attempt redoes the chunk that was under way
when its node was lost) is recorded again, so the file always names the node whose work the
chunk checkpoint holds. The sidecar lists one entry per chunk (`chunks`, built by `per_chunk`);
chunks with no record (the local executor records nothing: every chunk is this host's) are the
finishing worker's node. The file goes with the checkpoint it describes, once the job is
published. Standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE = "chunk_nodes.json"


def read(job_dir: Path) -> dict[int, dict[str, Any]]:
    """chunk (1-based) -> {"node": ..., "attempt": ...}; {} when nothing was recorded."""
    try:
        raw = json.loads((job_dir / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {int(k): v for k, v in raw.items() if str(k).isdigit() and isinstance(v, dict)}


def record(job_dir: Path, chunk: int, node: str, attempt: int) -> None:
    """Chunk `chunk` (1-based) is being rendered on `node` by attempt `attempt` (atomic rewrite)."""
    if chunk < 1:
        raise ValueError(f"chunk numbers start at 1, got {chunk}")
    nodes = read(job_dir)
    nodes[chunk] = {"node": node, "attempt": attempt}
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f".{FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(nodes.items())}), encoding="utf-8")
    tmp.replace(job_dir / FILE)


def per_chunk(job_dir: Path, num_chunks: int, node: str) -> list[dict[str, Any]]:
    """One entry per chunk 1..num_chunks: the recorded node (and attempt), else `node`."""
    nodes = read(job_dir)
    count = num_chunks if num_chunks > 0 else max(nodes, default=0)
    return [{"chunk": c, **nodes.get(c, {"node": node})} for c in range(1, count + 1)]


def forget(job_dir: Path) -> None:
    (job_dir / FILE).unlink(missing_ok=True)
