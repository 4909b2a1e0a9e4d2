"""A streamed checkpoint applied to the head's folder (daemon/ray_pool.py `write_checkpoint`), on
real files: the new files in place with `state.json` (the commit point) written last, then what
the actor's folder no longer holds removed; files being written are never sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

from daemon.ray_pool import Checkpoint, read_tree, write_checkpoint  # noqa: E402


def test_a_streamed_checkpoint_replaces_the_heads_and_drops_what_the_actor_removed(tmp_path: Path) -> None:
    head = tmp_path / "head"
    head.mkdir()
    (head / "tensors_0.safetensors").write_bytes(b"old tensors")
    (head / "seg_0.mp4").write_bytes(b"segment 0")
    (head / "state.json").write_text(json.dumps({"next_chunk": 1, "tensors": "tensors_0.safetensors"}))
    state = json.dumps({"next_chunk": 2, "tensors": "tensors_1.safetensors"}).encode()
    files = {"state.json": state, "tensors_1.safetensors": b"new tensors", "seg_1.mp4": b"segment 1"}
    write_checkpoint(
        head, Checkpoint("1.1", files, ("state.json", "tensors_1.safetensors", "seg_0.mp4", "seg_1.mp4"))
    )
    assert read_tree(head) == {**files, "seg_0.mp4": b"segment 0"}


def test_files_still_being_written_are_not_read(tmp_path: Path) -> None:
    (tmp_path / "seg_2.tmp.mp4").write_bytes(b"half a segment")
    (tmp_path / ".tensors_2.safetensors.tmp").write_bytes(b"half the tensors")
    (tmp_path / "state.json").write_text("{}")
    assert read_tree(tmp_path) == {"state.json": b"{}"}
