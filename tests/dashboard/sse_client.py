"""A small reader of server-sent event frames for tests (the wire format of the HTML standard)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Frame:
    event: str = "message"
    id: str | None = None
    data: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


def frames(lines: Iterator[str]) -> Iterator[Frame]:
    """Frames from a line iterator (e.g. `response.iter_lines()`); comment-only frames included."""
    frame, seen = Frame(), False
    for line in lines:
        if line == "":
            if seen:
                yield frame
            frame, seen = Frame(), False
            continue
        seen = True
        if line.startswith(":"):
            frame.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            frame.data = f"{frame.data}\n{value}" if frame.data else value
        elif name == "event":
            frame.event = value
        elif name == "id":
            frame.id = value
        elif name == "retry":
            frame.retry = int(value)


def take(stream: Iterator[Frame], count: int, *, skip_comments: bool = True) -> list[Frame]:
    out: list[Frame] = []
    for frame in stream:
        if skip_comments and not frame.data and frame.retry is None:
            continue
        out.append(frame)
        if len(out) == count:
            break
    return out
