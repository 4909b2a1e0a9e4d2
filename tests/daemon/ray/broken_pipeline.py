"""A pipeline factory whose load raises (`--pipeline-factory tests.daemon.ray.broken_pipeline:make`)."""

from __future__ import annotations

from typing import Any


def make(config: Any) -> Any:
    raise RuntimeError("the weights on this node are unreadable (broken_pipeline)")
