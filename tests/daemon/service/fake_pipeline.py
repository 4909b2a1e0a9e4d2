"""A stand-in pipeline for worker and daemon tests: a `pipeline.types.Renderer`, no model, real MP4.

`make(config)` is the factory the worker calls (`--pipeline-factory tests.daemon.service.fake_pipeline:make`).
Its `render` walks `chunks` x `steps` calling `on_progress` (so stop requests work at step
boundaries), writes a small H.264 MP4 with PyAV, and keeps a chunk checkpoint in the prepared work
folder so an interrupted job resumes. Words in the prompt steer it:

- `CRASH`: the worker process dies hard (os._exit) in the first chunk;
- `OOM`: raises an exception named OutOfMemoryError (a transient failure);
- `BROKEN`: raises RuntimeError (a permanent failure);
- `SLOW`: each step takes 0.3 s instead of the default.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.types import Progress, RenderResult

STEP_S = float(os.environ.get("FAKE_PIPELINE_STEP_S", "0.02"))
CHUNKS = 3


class OutOfMemoryError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class FakePrepared:
    request: Any
    work_dir: Path


class FakePipeline:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.device = "cpu"
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "fake": True}

    def prepare(self, request: Any, work_dir: Path) -> FakePrepared:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        return FakePrepared(request, Path(work_dir))

    def generate(
        self,
        request: Any,
        out_path: Path,
        *,
        on_progress: Any = None,
        should_stop: Any = None,
        checkpoint_dir: Path | None = None,
        poster_path: Path | None = None,
    ) -> RenderResult:
        work_dir = checkpoint_dir or Path(tempfile.mkdtemp(prefix="fake-"))
        prepared = self.prepare(request, work_dir)
        return self.render(prepared, out_path, on_progress=on_progress, resume=checkpoint_dir is not None)

    def render(
        self,
        prepared: FakePrepared,
        out_path: Path,
        *,
        poster_path: Path | None = None,
        on_progress: Any = None,
        should_stop: Any = None,
        resume: bool = True,
    ) -> RenderResult:
        self.calls += 1
        request = prepared.request
        steps = request.sample_steps
        step_s = 0.3 if "SLOW" in request.prompt else STEP_S
        start_chunk = 1
        marker = prepared.work_dir / "chunk.json"
        if resume and marker.exists():
            start_chunk = json.loads(marker.read_text())["done"] + 1
        log = prepared.work_dir / "log.txt"
        for chunk in range(start_chunk, CHUNKS + 1):
            logging.getLogger(__name__).info("fake render: chunk %d of %d", chunk, CHUNKS)
            with open(log, "a") as f:
                f.write(f"chunk {chunk} pid {os.getpid()}\n")
            for step in range(1, steps + 1):
                if "CRASH" in request.prompt:
                    os._exit(9)
                if "OOM" in request.prompt:
                    raise OutOfMemoryError("CUDA out of memory (fake)")
                if "BROKEN" in request.prompt:
                    raise RuntimeError("the fake pipeline is broken for this job")
                time.sleep(step_s)
                if on_progress is not None:
                    on_progress(
                        Progress(
                            stage="denoise",
                            chunk=chunk,
                            num_chunks=CHUNKS,
                            step=step,
                            num_steps=steps,
                            frames_done=0,
                            total_frames=CHUNKS * 5,
                        )
                    )
            marker.write_text(json.dumps({"done": chunk}))
        write_mp4(out_path, frames=CHUNKS * 5)
        if on_progress is not None:
            on_progress(
                Progress(
                    stage="done",
                    chunk=CHUNKS,
                    num_chunks=CHUNKS,
                    step=steps,
                    num_steps=steps,
                    frames_done=CHUNKS * 5,
                    total_frames=CHUNKS * 5,
                )
            )
        return RenderResult(
            video_path=out_path,
            poster_path=None,
            num_frames=CHUNKS * 5,
            fps=25,
            duration_s=CHUNKS * 5 / 25,
            width=32,
            height=32,
            seed=request.seed,
            timings_s={"denoise": 0.0},
            resumed_from_chunk=start_chunk - 1,
        )


def write_mp4(path: Path, *, frames: int) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = Fraction(1, 25)
        for i in range(frames):
            img = np.full((32, 32, 3), (i * 15) % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def make(config: Any) -> FakePipeline:
    return FakePipeline(config)
