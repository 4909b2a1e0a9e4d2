"""`infinitetalk bench` on the CPU with the tiny model: every section runs and reports sensibly.

The real measurements need a GPU (tests/gpu, docs/benchmarks.md); this checks the code paths:
random models built from configs, plain vs fast forward (same weights: tiny relative error),
fp8 quantisation, the VAE phase, the two-chunk loop with motion frames, the text report and the
CLI's option parsing.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_opts(tiny_weights_dir):
    from pipeline.bench import BenchOptions
    from pipeline.config import load_model_config

    mc = load_model_config(tiny_weights_dir)
    return BenchOptions(
        sizes=("480",),
        chunk_sizes=("480",),
        dtypes=("bf16", "fp8"),
        passes=(1,),
        compile=False,
        device="cpu",
        dit=mc.dit,
        vae=mc.vae,
        clip=mc.clip,
        t5_config=mc.t5,
        pixel_sizes={"480": (32, 32)},
        frame_num=9,
        motion_frame=5,
        warmup=0,
        repeats=1,
        load_probe_blocks=1,
    )


def test_bench_runs_every_section_on_cpu(tiny_opts, tmp_path):
    from pipeline.bench import format_report, run_bench

    partial: list[dict] = []
    report = run_bench(tiny_opts, log=lambda m: None, checkpoint=partial.append)
    json.dumps(report)  # JSON-ready
    assert report["errors"] == {}
    assert len(partial) >= 6 and "build" in partial[0]
    fwd = report["forward"]["480"]
    assert set(fwd) == {"plain", "bf16", "fp8"}  # no fp8 attention on the CPU: said, not timed
    assert report["fp8_attention_unavailable"] == "fp8 attention needs a CUDA device, got cpu"
    assert fwd["plain"]["settings"]["rope"] == "exact" and fwd["bf16"]["settings"]["rope"] == "fast"
    assert fwd["bf16"]["rel_err_vs_plain"] < 1e-5  # float32 tiny model: fast RoPE vs float64 RoPE
    assert 1e-5 < fwd["fp8"]["rel_err_vs_plain"] < 0.2  # quantised weights: close, not equal
    assert fwd["fp8"]["settings"]["fp8_layers"] == tiny_opts.dit.num_layers * 15
    assert report["load"]["blocks"] == 1 and report["load"]["load_s"] > 0
    chunks = report["chunks"]["480"]
    for dtype_name in ("bf16", "fp8"):
        entry = chunks[dtype_name]["1-pass"]
        assert entry["frames_shape"] == [3, tiny_opts.frame_num, 32, 32] and entry["finite"]
        first, second = entry["chunks"]
        assert "clip_s" in first and "vae_encode_y_s" in first and "t5_s" in first
        assert "clip_s" not in second and second["denoise_s"] > 0 and second["vae_decode_s"] > 0
        new = tiny_opts.frame_num - tiny_opts.motion_frame
        assert entry["gpu_s_per_video_s"] == pytest.approx(second["total_s"] / (new / 25), rel=0.02)
    text = format_report(report)
    assert "480p plain" in text and "480p fp8" in text and "GPU-s per video-s" in text


def test_flop_model_matches_the_spec():
    from pipeline.bench import Shape, dit_forward_flops
    from pipeline.config import DiTConfig

    cfg = DiTConfig()
    assert dit_forward_flops(
        cfg, Shape(name="480", height=480, width=832, frame_num=81)
    ) / 1e15 == pytest.approx(1.825, rel=0.01)
    assert dit_forward_flops(
        cfg, Shape(name="720", height=720, width=1280, frame_num=81)
    ) / 1e15 == pytest.approx(6.860, rel=0.01)


def test_cli_options():
    from daemon import bench_cmd

    parser = argparse.ArgumentParser()
    bench_cmd.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "bench",
            "--size",
            "both",
            "--dtype",
            "both",
            "--passes",
            "2",
            "--no-compile",
            "--attention",
            "cudnn",
            "--fp8-attention",
            "off",
            "--quick",
        ]
    )
    opts = bench_cmd.options_from_args(args)
    assert opts.sizes == ("480",) and opts.dtypes == ("bf16", "fp8") and opts.passes == (2,)
    assert not opts.compile and opts.attention == "cudnn" and opts.load_probe_blocks == 0
    assert opts.fp8_attention == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--passes", "3"])


def test_perf_config_rejects_bad_values():
    from pipeline.perf import PerfConfig

    with pytest.raises(ValueError, match="'fastest'"):
        PerfConfig(rope="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'xformers'"):
        PerfConfig(attention="xformers")  # type: ignore[arg-type]
    assert PerfConfig.plain().compile is False and PerfConfig().compile is True


def test_cudnn_backend_refuses_cpu_tensors():
    from pipeline.models.attention import attention

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="cudnn attention needs CUDA"):
        attention(q, q, q, backend="cudnn")
    assert torch.allclose(attention(q, q, q, backend="auto"), attention(q, q, q, backend="sdpa"))


def test_fa4_routing_by_key_length():
    """ "fa4" sends long key sequences to FlashAttention 4 and short ones (cross-attention) to cuDNN."""
    from pipeline.models import attention as att

    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    short = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    long = torch.randn(1, att.FA4_MIN_KEYS, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cudnn attention needs CUDA"):
        att.attention(q, short, short, backend="fa4")
    with pytest.raises(ValueError, match="FlashAttention 4 needs CUDA fp16/bf16 tensors, got cpu"):
        att.attention(q, long, long, backend="fa4")
    assert att.resolve_backend("auto", q) == "sdpa"  # CPU
    with pytest.raises(ValueError, match="attention backend must be one of"):
        att.resolve_backend("xformers", q)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sdpa", "cudnn", "fa4"])
def test_resolving_a_concrete_backend_keeps_one_graph(backend, monkeypatch):
    """Inside a compiled block the backend is already concrete: resolving it again must not query
    the device or the installed packages (each such call would split the compiled graph)."""
    from pipeline.models import attention as att
    from pipeline.models.attention import resolve_backend

    def no_query(*args):
        raise AssertionError("device or package query while resolving a concrete backend")

    monkeypatch.setattr(att, "cudnn_preferred", no_query)
    monkeypatch.setattr(att, "fa4_available", no_query)
    monkeypatch.setattr(att, "flash_available", no_query)
    assert resolve_backend(backend, torch.randn(1, 1, 1, 8, dtype=torch.bfloat16)) == backend

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if resolve_backend(backend, x) == backend else x

    explained = torch._dynamo.explain(fn)(torch.randn(4))
    assert explained.graph_break_count == 0


def test_default_perf_is_fast_on_cuda_only():
    from pipeline.perf import PerfConfig, default_perf

    assert default_perf("cpu") is None
    assert default_perf("cuda") == PerfConfig()
    assert default_perf("cuda:0", quant="fp8").fp8 is True
    assert default_perf("cuda", attention="flash3").attention == "flash"
    with pytest.raises(ValueError, match="'xformers'"):
        default_perf("cuda", attention="xformers")


def test_bench_under_a_memory_budget_on_cpu(tiny_opts):
    """`--gpu-memory-gib`: the chunk loop runs under the plan (blocks streamed, in/out encoders),
    reports the plan and the host-to-device traffic, and leaves the models resident again."""
    import dataclasses

    from pipeline.bench import Bench, format_report, run_bench
    from pipeline.placement import GiB, PlacementError

    opts = dataclasses.replace(
        tiny_opts,
        sizes=(),
        dtypes=("bf16",),
        passes=(2,),
        load_probe_blocks=0,
        dit=dataclasses.replace(tiny_opts.dit, num_layers=6),
    )
    probe = Bench(opts, log=lambda m: None)
    probe.build()
    with pytest.raises(PlacementError) as info:
        probe.placer.plan_for(probe.shape("480"), 2, 1e-6)
    smallest = info.value.min_gpu_bytes / GiB  # the smallest budget: every block streams
    report = run_bench(dataclasses.replace(opts, gpu_memory_gib=(smallest,)), log=lambda m: None)
    assert report["errors"] == {}
    by_pass = report["chunks"]["480"]["bf16"]
    plain, budgeted = by_pass["2-pass"], by_pass[f"2-pass@{smallest:g}GiB"]
    plan = budgeted["placement"]
    assert plan["swapped_blocks"] == 6 and plan["resident_blocks"] == 0 and plan["t5"] != "gpu"
    # both guidance passes of a step share one copy of each streamed block
    from pipeline.offload import module_bytes

    block = module_bytes(probe.dit.blocks[0])
    assert 6 * block <= budgeted["h2d_bytes_per_step"] <= 6 * block * 1.1
    assert "h2d_bytes_per_step" not in plain
    assert budgeted["dit_forwards_per_chunk"] == plain["dit_forwards_per_chunk"] == 2 * opts.steps
    assert budgeted["frames_shape"] == plain["frames_shape"] and budgeted["finite"]
    assert f"plan: budget {smallest:.4f}"[:18] in format_report(report)
