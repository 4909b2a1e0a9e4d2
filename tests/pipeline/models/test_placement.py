"""The GPU memory planner (pipeline.placement): decisions for given sizes and budgets, refusals
that name the numbers, quant = "auto", the budget setting. Pure functions, no GPU."""

from __future__ import annotations

import pytest

from pipeline.placement import (
    GiB,
    MemoryBudget,
    ModelSizes,
    PlacementError,
    WorkingSet,
    plan,
    resolve_budget,
    resolve_quant,
)

#: the released model's sizes as loaded (fp8 DiT: 40 blocks of 0.47 GB; bf16 umT5, fp16 CLIP)
FP8 = ModelSizes(
    num_blocks=40,
    block_bytes=470_000_000,
    dit_other_bytes=400_000_000,
    t5_bytes=11_400_000_000,
    clip_bytes=1_260_000_000,
    wav2vec_bytes=380_000_000,
    vae_bytes=250_000_000,
)
WORK = WorkingSet(
    dit_forward=int(2.4 * GiB),
    dit_pass_state=int(0.35 * GiB),
    passes=2,
    t5=int(0.1 * GiB),
    clip=int(0.3 * GiB),
    wav2vec=int(0.4 * GiB),
    vae=(
        ((1, 1), int(3.9 * GiB)),
        ((1, 2), int(2.1 * GiB)),
        ((2, 2), int(1.2 * GiB)),
        ((4, 4), int(0.4 * GiB)),
    ),
    job_held=int(0.5 * GiB),
)
HOST = 128 * GiB


def budget(gib: float, host: float = 128, running: int = 1) -> MemoryBudget:
    return MemoryBudget(
        gpu_bytes=int(gib * GiB), host_bytes=int(host * GiB), max_running=running, margin_bytes=GiB // 2
    )


def bf16() -> ModelSizes:
    import dataclasses

    return dataclasses.replace(FP8, block_bytes=930_000_000)


# budget GiB -> (umT5, CLIP, fewest / most streamed blocks, VAE tiled?)
TABLE = [
    (139, "gpu", "gpu", 0, 0, False),  # an H200: everything resident, nothing tiled
    (48, "gpu", "gpu", 0, 0, False),  # 48 GB cards: the whole fp8 stack fits
    (32, None, None, 0, 40, None),  # tight: something gives, the plan still fits
    (24, None, "inout", 1, 40, True),  # a 24 GB card: blocks stream, CLIP moves in and out
    (16, None, "inout", 10, 40, True),
    (12, "cpu", None, 20, 40, None),
    (8, "cpu", "inout", 30, 40, True),  # 8 GB: almost everything streams, the VAE tiles
]


@pytest.mark.parametrize(("gib", "t5", "clip", "lo", "hi", "tiled"), TABLE)
def test_planner_decisions(gib, t5, clip, lo, hi, tiled) -> None:
    p = plan(FP8, WORK, budget(gib))
    assert p.expected_peak_bytes + GiB // 2 <= p.budget_bytes
    assert t5 is None or p.t5 == t5, p.summary()
    assert clip is None or p.clip == clip, p.summary()
    assert lo <= p.swapped_blocks <= hi, p.summary()
    assert tiled is None or (p.vae_tiles != (1, 1)) == tiled, p.summary()
    assert p.swap_slots == (2 if p.swapped_blocks else 0)
    streamed = p.swapped_blocks * FP8.block_bytes
    assert p.pinned_host_bytes >= streamed and p.host_bytes >= p.pinned_host_bytes


def test_more_memory_never_costs_more() -> None:
    plans = [plan(FP8, WORK, budget(g)) for g in (8, 10, 12, 16, 20, 24, 32, 40, 48, 80)]
    costs = [p.cost for p in plans]
    assert costs == sorted(costs, reverse=True)
    assert plans[-1].all_resident and plans[-1].cost == 0


def test_bf16_fits_40_gib_with_streaming_and_80_without() -> None:
    at40 = plan(bf16(), WORK, budget(40))
    assert 0 < at40.swapped_blocks < 40
    assert plan(bf16(), WORK, budget(80)).all_resident


def test_summary_is_one_readable_line() -> None:
    p = plan(FP8, WORK, budget(24))
    text = p.summary()
    assert text.startswith("budget 24.0 GiB: umT5 ") and "CLIP in/out" in text and "VAE tiled 1x2" in text
    assert f"{p.swapped_blocks} of 40 blocks swapped" in text and "expected peak" in text
    d = p.as_dict()
    assert d["budget_gib"] == 24.0 and d["swapped_blocks"] == p.swapped_blocks and d["summary"] == text


def test_too_small_a_budget_names_the_smallest_that_works() -> None:
    with pytest.raises(PlacementError) as info:
        plan(FP8, WORK, budget(2))
    message = str(info.value)
    need = info.value.min_gpu_bytes
    assert need is not None and "2.0 GiB" in message and f"{need / GiB:.1f} GiB" in message
    # the number it names is enough, and just below it is not
    assert plan(FP8, WORK, MemoryBudget(gpu_bytes=need, host_bytes=HOST, margin_bytes=GiB // 2))
    with pytest.raises(PlacementError):
        plan(FP8, WORK, MemoryBudget(gpu_bytes=need - 1, host_bytes=HOST, margin_bytes=GiB // 2))


def test_host_memory_too_small_names_both_numbers() -> None:
    with pytest.raises(PlacementError) as info:
        plan(FP8, WORK, budget(8, host=4))
    message = str(info.value)
    assert "4.0 GiB available" in message and info.value.min_host_bytes is not None
    assert f"{info.value.min_host_bytes / GiB:.1f} GiB" in message
    # with enough RAM for some plan but not the cheapest, a costlier plan is chosen
    roomy = plan(FP8, WORK, budget(32))
    tight = plan(FP8, WORK, budget(32, host=roomy.host_bytes / GiB - 1))
    assert tight.host_bytes < roomy.host_bytes and tight.cost >= roomy.cost


def test_running_jobs_count_in_the_plan() -> None:
    """Each job that may prepare beside a render holds wav2vec2 working memory on the GPU."""
    one = plan(FP8, WORK, budget(48, running=1))
    three = plan(FP8, WORK, budget(48, running=3))
    if three.wav2vec == "gpu":
        assert three.expected_peak_bytes - one.expected_peak_bytes == 2 * WORK.wav2vec
    assert three.job_slots == 1  # renders are serialised: one render's working set


def test_budget_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="got 0"):
        MemoryBudget(gpu_bytes=0, host_bytes=HOST)
    with pytest.raises(ValueError, match="max_running must be >= 1, got 0"):
        MemoryBudget(gpu_bytes=GiB, host_bytes=HOST, max_running=0)


def test_budget_setting_on_the_cpu() -> None:
    assert resolve_budget("cpu", "auto") is None and resolve_budget("cpu", None) is None
    b = resolve_budget("cpu", 0.5, max_running=3, host_bytes=HOST)
    assert b is not None and b.gpu_bytes == GiB // 2 and b.max_running == 3 and b.margin_bytes == 0
    with pytest.raises(ValueError, match="'lots'"):
        resolve_budget("cpu", "lots")
    with pytest.raises(ValueError, match="got -1"):
        resolve_budget("cpu", -1)


@pytest.mark.parametrize(
    ("requested", "device", "cap", "fits", "expected", "why"),
    [
        ("auto", "cpu", None, True, None, "none on cpu"),
        ("auto", "cuda", (9, 0), True, "fp8", "9.0 has fp8 tensor cores"),  # H100/H200
        ("auto", "cuda", (8, 9), True, "fp8", "8.9 has fp8"),  # L40S, RTX 4090
        ("auto", "cuda", (8, 0), True, None, "fits the budget whole"),  # A100-80GB
        ("auto", "cuda", (8, 0), False, "fp8", "weight-only fp8"),  # A100-40GB, A6000
        ("none", "cuda", (9, 0), False, None, "quant = none"),
        (None, "cuda", (9, 0), False, None, "quant = none"),
        ("fp8", "cpu", None, True, "fp8", "quant = fp8"),
    ],
)
def test_quant_auto(requested, device, cap, fits, expected, why) -> None:
    quant, reason = resolve_quant(
        requested, device_type=device, capability=cap, bf16_all_resident=lambda: fits
    )
    assert quant == expected and why in reason


def test_quant_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="'int8'"):
        resolve_quant("int8", device_type="cuda", capability=(9, 0), bf16_all_resident=lambda: True)
