"""Pure pieces of generation: timesteps, Euler step, guidance, chunk windows, buckets, colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import buckets, color, guidance, sampler, windows
from pipeline.config import FULL_BUCKETS


def test_timesteps_match_the_formula() -> None:
    for steps, shift in [(4, 2.0), (40, 7.0), (1, 11.0), (8, 1.0)]:
        t = sampler.timesteps(steps, shift)
        assert t.dtype == torch.float32 and t.shape == (steps + 1,)
        grid = np.append(np.linspace(1000, 1, steps), 0.0)
        u = grid / 1000
        expected = 1000 * shift * u / (1 + (shift - 1) * u)
        np.testing.assert_allclose(t.numpy(), expected, rtol=1e-6, atol=1e-4)
        assert t[0] == 1000 and t[-1] == 0
    with pytest.raises(ValueError, match="num_steps"):
        sampler.timesteps(0, 2.0)


def test_euler_step_is_x_minus_v_dt() -> None:
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = sampler.timesteps(4, 2.0)
    out = sampler.euler_step(x, v, t[1], t[2])
    torch.testing.assert_close(out, x - v * (t[1] - t[2]) / 1000)


def test_guidance_passes_and_formulas() -> None:
    assert guidance.passes(5.0, 4.0) == ("cond", "drop_text", "uncond")
    assert guidance.passes(1.0, 2.0) == ("cond", "drop_audio")
    assert guidance.passes(1.0, 1.0) == ("cond",)
    assert guidance.passes(5.0, 1.0) == ("cond", "drop_text")
    g = torch.Generator().manual_seed(1)
    c, dt, u, da = (torch.randn(3, 4, generator=g) for _ in range(4))
    preds = {"cond": c, "drop_text": dt, "uncond": u, "drop_audio": da}
    torch.testing.assert_close(guidance.combine(preds, 5.0, 4.0), u + 5 * (c - dt) + 4 * (dt - u))
    torch.testing.assert_close(guidance.combine(preds, 1.0, 2.0), da + 2 * (c - da))
    assert guidance.combine(preds, 1.0, 1.0) is c
    # audio scale 1: uncond cancels out of the 3-pass formula
    torch.testing.assert_close(guidance.combine(preds, 5.0, 1.0), u + 5 * (c - dt) + 1 * (dt - u))
    with pytest.raises(ValueError, match="drop_audio"):
        guidance.combine({"cond": c}, 1.0, 2.0)


def _reference_chunk_starts(t: int, f: int, m: int, max_frames: int) -> list[int]:
    """The reference's loop (model.md 1.8), simulated on integers."""
    starts, start, arrive = [0], 0, False
    while True:
        if arrive:
            break
        start += f - m
        if start + f >= min(max_frames, t):
            arrive = True
        if max_frames <= f:
            break
        starts.append(start)
    return starts


@pytest.mark.parametrize("t", [82, 100, 153, 154, 226, 1500, 15000])
@pytest.mark.parametrize("max_frames", [None, 81, 90, 400])
def test_chunk_plan_matches_the_reference_loop(t: int, max_frames: int | None) -> None:
    plan = windows.plan_chunks(t, frame_num=81, motion_frame=9, max_frame_num=max_frames, mode="streaming")
    cap = 10**9 if max_frames is None else max_frames
    assert list(plan.starts) == _reference_chunk_starts(t, 81, 9, cap)
    assert plan.total_frames == min(cap, t)
    # every output frame is written exactly once
    covered = [i for k in range(plan.num_chunks) for i in range(*plan.new_frames(k))]
    assert covered == list(range(plan.total_frames))


def test_no_40_second_cap_and_clip_mode() -> None:
    ten_minutes = 10 * 60 * 25
    plan = windows.plan_chunks(
        ten_minutes, frame_num=81, motion_frame=9, max_frame_num=None, mode="streaming"
    )
    assert plan.total_frames == ten_minutes and plan.num_chunks == 1 + -(-(ten_minutes - 81) // 72)
    clip = windows.plan_chunks(ten_minutes, frame_num=81, motion_frame=9, max_frame_num=None, mode="clip")
    assert clip.starts == (0,) and clip.total_frames == 81
    with pytest.raises(ValueError, match="at least one is needed"):  # shorter speech: one chunk cut to it
        windows.plan_chunks(0, frame_num=81, motion_frame=9, max_frame_num=None, mode="streaming")


def test_audio_windows_and_padding() -> None:
    feats = torch.arange(10.0).reshape(10, 1, 1)
    idx = windows.window_indices(0, 5, 10)
    assert idx[0].tolist() == [0, 0, 0, 1, 2] and idx[4].tolist() == [2, 3, 4, 5, 6]
    padded = windows.pad_features(feats, 12)  # end 12 >= T 10 -> 5 reflected rows
    assert padded[:, 0, 0].tolist() == list(range(10)) + [9, 8, 7, 6, 5]
    assert windows.pad_features(feats, 9) is feats
    for start in range(0, 9):  # reading the reflection in place equals padding first
        torch.testing.assert_close(
            windows.chunk_audio(feats, start, 5, end=12), windows.chunk_audio(padded, start, 5)
        )
    win = windows.chunk_audio(padded, 8, 5)
    assert (
        win.shape == (5, 5, 1, 1)
        and win[-1, :, 0, 0].tolist() == [9, 8, 7, 6, 5]
        and win[0, :, 0, 0].tolist() == [6, 7, 8, 9, 9]
    )


def test_buckets_keys_match_the_reference_table() -> None:
    keys = [buckets.bucket_key(h, w) for h, w in FULL_BUCKETS["infinitetalk-480"]]
    assert keys == [0.26, 0.38, 0.5, 0.67, 0.82, 1.0, 1.22, 1.5, 1.86, 2.0, 2.5, 2.83, 3.6, 3.8, 4.0]
    keys720 = [buckets.bucket_key(h, w) for h, w in FULL_BUCKETS["infinitetalk-720"]]
    assert keys720[7] == 0.88 and keys720[19] == 3.62
    assert buckets.closest_bucket(FULL_BUCKETS, "infinitetalk-480", 1080, 1920) == (448, 896)
    assert buckets.closest_bucket(FULL_BUCKETS, "infinitetalk-480", 1920, 1080) == (832, 448)
    assert buckets.closest_bucket(FULL_BUCKETS, "infinitetalk-720", 1080, 1920) == (704, 1280)
    with pytest.raises(ValueError, match="infinitetalk-1080"):
        buckets.closest_bucket(FULL_BUCKETS, "infinitetalk-1080", 10, 10)


def test_resize_and_crop_geometry() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 97, 3), dtype=np.uint8))
    out = buckets.resize_and_crop(img, (32, 48))
    # cover scale = max(32/61, 48/97); 32/61*61 == 32.0 -> 32 x ceil(50.9)=51; crop left round(3/2) = 2
    ref = np.asarray(img.resize((51, 32), resample=Image.BILINEAR))[0:32, 2:50]
    np.testing.assert_array_equal(out, ref)
    x = buckets.to_model_frame(out)
    assert x.shape == (3, 1, 32, 48) and x.min() >= -1 and x.max() <= 1
    masks = buckets.resize_and_crop_masks(torch.ones(3, 61, 97), (32, 48))
    assert masks.shape == (3, 32, 48) and masks.min() == 1


def _lab_direct(rgb: np.ndarray) -> np.ndarray:
    """sRGB -> Lab for one pixel, written out from the textbook formulas."""
    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in rgb]
    m = color.XYZ_FROM_RGB
    xyz = [sum(m[i][j] * lin[j] for j in range(3)) / color.WHITE_D65[i] for i in range(3)]
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in xyz]
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_lab_conversion_against_direct_formula_and_roundtrip() -> None:
    rgb = torch.rand(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lab = color.rgb_to_lab(rgb)
    for i in range(0, 50, 7):
        np.testing.assert_allclose(lab[i].numpy(), _lab_direct(rgb[i].numpy()), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        color.rgb_to_lab(torch.ones(1, 3, dtype=torch.float64))[0].numpy(), [100, 0, 0], atol=1e-2
    )
    torch.testing.assert_close(color.lab_to_rgb(lab), rgb, rtol=1e-6, atol=1e-6)


def test_match_colors_moves_statistics_to_the_reference() -> None:
    g = torch.Generator().manual_seed(4)
    ref = torch.rand(3, 1, 8, 8, generator=g) * 0.5 - 0.6  # dark reference
    frames = torch.rand(3, 2, 8, 8, generator=g) * 0.5 + 0.3  # bright frames
    out = color.match_colors(frames, ref, 1.0)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    lab_ref = color.rgb_to_lab(((ref.double() + 1) / 2).reshape(3, -1).T)
    lab_out = color.rgb_to_lab(((out[:, 0].double() + 1) / 2).reshape(3, -1).T)
    assert abs(lab_out[:, 0].mean() - lab_ref[:, 0].mean()) < 1.0
    assert color.match_colors(frames, ref, 0.0) is frames
    half = color.match_colors(frames, ref, 0.5)
    torch.testing.assert_close(half, (frames + out) / 2, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="strength"):
        color.match_colors(frames, ref, 1.5)


def test_apg_momentum_norm_cap_and_projection() -> None:
    """APG pieces against their definitions (the reference's MomentumBuffer, norm cap, project)."""
    gen = torch.Generator().manual_seed(3)
    cond = torch.randn(4, 3, 5, 6, generator=gen)
    d1, d2 = torch.randn(2, 4, 3, 5, 6, generator=gen)
    apg = guidance.APG(momentum=-0.75, norm_threshold=1e9)
    first = apg("text", d1, cond)
    # only the part orthogonal to cond is kept, and nothing else changes
    assert abs(float((first.double() * cond.double()).sum())) < 1e-6 * float(cond.norm() * d1.norm())
    unit = cond.double() / cond.double().norm()
    torch.testing.assert_close(first.double(), d1.double() - (d1.double() * unit).sum() * unit)
    second = apg("text", d2, cond)  # momentum: running = d2 - 0.75 * d1
    running = d2.double() - 0.75 * d1.double()
    torch.testing.assert_close(second.double(), running - (running * unit).sum() * unit, atol=1e-6, rtol=1e-6)
    # the cap: a difference scaled to norm 2 before projecting; a separate buffer per difference
    capped = guidance.APG(momentum=0.0, norm_threshold=2.0)("audio", d1, cond)
    scaled = d1.double() * (2.0 / d1.double().norm())
    torch.testing.assert_close(capped.double(), scaled - (scaled * unit).sum() * unit, atol=1e-6, rtol=1e-6)
    # combine: same passes as plain guidance; a scale of 1 zeroes its term
    preds = {"cond": cond, "drop_text": cond - d1, "uncond": cond - d1 - d2, "drop_audio": cond - d2}
    assert torch.equal(guidance.combine(preds, 1.0, 1.0, guidance.APG()), cond)
    two = guidance.combine(preds, 1.0, 2.0, guidance.APG(norm_threshold=0))
    torch.testing.assert_close(two, cond + guidance.APG(norm_threshold=0)("audio", d2, cond))
    three = guidance.combine(preds, 5.0, 4.0, guidance.APG(norm_threshold=0))
    fresh = guidance.APG(norm_threshold=0)
    torch.testing.assert_close(three, cond + 4.0 * fresh("text", d1, cond) + 3.0 * fresh("audio", d2, cond))
