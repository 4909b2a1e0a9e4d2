"""Issue 16 step 4: the chunk loop as a pure function, one LoadOptions for every loader, the
worker's one Renderer call path, and "what is in this weights folder" answered once."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import pytest
import torch

from daemon import render_cmd, runner
from daemon.config import load_settings
from pipeline import guidance, sampler
from pipeline.denoise import ChunkConditions, denoise_chunk
from pipeline.types import Renderer, StopRequested
from pipeline.weights_layout import FULL_MARKER, has_weights, is_tiny, write_tiny_once


class Linear:
    """A DiT stand-in: velocity = latent * (1 + audio.mean()), so each pass's inputs show."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x, t, context, clip_fea, y, audio, masks):  # noqa: ANN001, ANN204
        self.calls.append(tuple(x.shape))
        return x * (1.0 + audio.float().mean())


def _conditions(motion: torch.Tensor) -> ChunkConditions:
    audio = torch.ones(1, 1, 5, 2, 2, 2)
    context = torch.zeros(1, 3, 4)
    return ChunkConditions(
        clip_fea=torch.zeros(1, 2, 4),
        y=torch.zeros(1, 20, 3, 2, 2),
        motion=motion,
        masks=None,
        by_pass={guidance.COND: (context, audio), guidance.DROP_AUDIO: (context, torch.zeros_like(audio))},
    )


def test_denoise_chunk_runs_the_guidance_passes_and_keeps_the_motion_latents() -> None:
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 3, 2, 2, generator=gen)
    motion = torch.full((16, 1, 2, 2), 7.0)
    steps = sampler.timesteps(3, 2.0)
    passes = (guidance.COND, guidance.DROP_AUDIO)
    dit, seen = Linear(), []
    out = denoise_chunk(
        dit, latent.clone(), _conditions(motion), steps, passes, 1.0, 2.0, on_step=seen.append
    )
    assert len(dit.calls) == 3 * 2 and seen == [1, 2, 3]
    assert torch.equal(out[:, :1], motion)  # the motion latents overwrite the first frame
    expected = latent.clone()  # the same loop written out: cond 2x, drop-audio 1x, audio scale 2
    for i in range(3):
        expected[:, :1] = motion
        preds = {guidance.COND: expected * 2.0, guidance.DROP_AUDIO: expected * 1.0}
        velocity = guidance.combine(preds, 1.0, 2.0)
        expected = sampler.euler_step(expected, velocity, steps[i], steps[i + 1])
    expected[:, :1] = motion
    assert torch.equal(out, expected)


def test_denoise_chunk_stops_between_steps() -> None:
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    dit = Linear()
    with pytest.raises(StopRequested, match="before step 3"):
        denoise_chunk(
            dit, torch.zeros(16, 3, 2, 2), _conditions(torch.zeros(16, 1, 2, 2)), sampler.timesteps(4, 2.0),
            (guidance.COND,), 1.0, 1.0, should_stop=should_stop,
        )  # fmt: skip
    assert len(dit.calls) == 2


def _config(tmp_path: Path, text: str):
    path = tmp_path / "infinitetalk.toml"
    path.write_text(text)
    return load_settings(path, environ={})


def test_render_honours_attention_and_performance_like_the_worker(tmp_path: Path) -> None:
    """`infinitetalk render` used to pass only quant/lora/lora_scale: the config's attention and
    [performance] (speed settings, memory budget) were ignored."""
    import dataclasses

    s = _config(
        tmp_path,
        'attention = "sdpa"\nquant = "none"\nlora_scale = 0.5\n[performance]\nrope = "exact"\n'
        "compile = false\ngpu_memory_gib = 3\n",
    )
    args = argparse.Namespace(device="cpu", dtype=None)
    opts = render_cmd.load_options(args, s)
    assert opts.attention == "sdpa" and opts.quant == "none" and opts.lora_scale == 0.5
    assert dict(opts.perf or ())["rope"] == "exact" and dict(opts.perf or ())["compile"] is False
    assert opts.gpu_memory_gib == 3.0 and opts.device == "cpu" and opts.dtype == "fp32"
    from daemon.supervisor import worker_config  # what the daemon hands its workers

    config = worker_config(s, tmp_path, tiny=False, factory="")
    worker = runner.load_options(dataclasses.replace(config, device="cpu", max_running=1, warmup=False))
    assert dataclasses.replace(worker, dtype="fp32") == opts  # one meaning of every setting
    bare = render_cmd.load_options(argparse.Namespace(device="cpu", dtype="fp32"), None)
    assert bare.perf is None and bare.quant == "auto" and bare.lora == "auto"


def test_worker_refuses_a_factory_that_is_not_a_renderer(tmp_path: Path) -> None:
    config = runner.WorkerConfig(weights_dir=tmp_path, factory="builtins:str", warmup=False)
    with pytest.raises(TypeError, match="builtins:str gave str, not a pipeline.types.Renderer"):
        runner.load_pipeline(config)


def test_fake_pipeline_is_a_renderer() -> None:
    from tests.daemon.service.fake_pipeline import FakePipeline

    assert isinstance(FakePipeline(None), Renderer)


def test_a_stop_while_waiting_for_the_gpu_stops_the_job(tmp_path: Path) -> None:
    from tests.daemon.service.fake_pipeline import FakePipeline

    worker = runner.Worker(FakePipeline(None), None, runner.WorkerConfig(weights_dir=tmp_path))  # type: ignore[arg-type]
    stop = threading.Event()
    worker.gpu_lock.acquire()  # another job renders
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(StopRequested), worker._gpu("job", stop):
            pytest.fail("the lock is held: the body never runs")
    finally:
        worker.gpu_lock.release()
    assert time.monotonic() - t0 < 2.0
    with worker._gpu("job", threading.Event()):  # free again: taken at once
        assert worker.gpu_lock.locked()
    assert not worker.gpu_lock.locked()


def test_weights_folder_is_answered_in_one_place(tmp_path: Path, tiny_weights_dir: Path) -> None:
    from daemon import weights_guard

    assert weights_guard.has_weights is has_weights  # the daemon asks the pipeline's answer
    assert has_weights(tiny_weights_dir) and is_tiny(tiny_weights_dir)
    full = tmp_path / "full"
    (full / FULL_MARKER).parent.mkdir(parents=True)
    (full / FULL_MARKER).write_text("{}")
    assert has_weights(full) and not is_tiny(full)
    assert not has_weights(tmp_path / "empty")
    assert write_tiny_once(full) is False and not is_tiny(full)  # a folder with weights is kept
