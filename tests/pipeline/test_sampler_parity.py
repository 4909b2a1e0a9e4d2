"""Sampler parity: each chunk's latents equal the reference's loop (tools/parity/make_sampler_fixture.py).

Same tiny weights (seed 0), same media, same seed, hence the same initial noise (the reference
seeds the global CPU generator, the pipeline its own generator with the same seed); the
fixtures hold the latents the reference handed to its VAE decoder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.parity import load_tool, read_fixture, render_capturing


@pytest.mark.parametrize("case", ["sampler_3pass", "sampler_2pass", "sampler_apg_3pass", "sampler_apg_2pass"])
def test_one_chunk_latents_equal_the_reference_loop(plain_pipe, tmp_path: Path, case: str) -> None:
    tool = load_tool("make_sampler_fixture")
    tensors, meta = read_fixture(case)
    expected = tensors["latents"]
    steps, shift, text_scale, audio_scale = tool.CASES[case]
    assert (int(meta["steps"]), float(meta["text_scale"])) == (steps, text_scale)
    image, audio = tool.make_media(tmp_path, case)
    calls = plain_pipe.dit_calls
    _, (latents,) = render_capturing(plain_pipe, tool.request_for(image, audio, case), tmp_path / "out.mp4")
    assert plain_pipe.dit_calls - calls == steps * (3 if text_scale != 1 else 2)
    assert latents.shape == expected.shape
    print(f"{case}: max |ours - reference| = {(latents - expected).abs().max():.3e}")
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("case", "chunks"),
    [
        ("sampler_stream", 3),
        ("sampler_multi", 2),
        ("sampler_stream_color", 3),
        ("sampler_stream_tail", 3),
        ("sampler_dub", 3),
    ],
)
def test_streaming_chunks_equal_the_reference_loop(
    plain_pipe, tmp_path: Path, case: str, chunks: int
) -> None:
    """Streaming: each later chunk is conditioned on the previous one's last 9 decoded frames (VAE
    encode) and takes its audio windows 24 frames on; the third chunk draws its noise after the
    reference's (unused) motion-noise draws of the second. `sampler_multi`: two speakers (multi
    weights, region masks from bboxes, 3 guidance passes with the one-person null audio);
    `sampler_stream_color`: colour correction on; `sampler_stream_tail`: no frame cap, the last
    chunk's audio runs past the speech (mirrored padding) and the video is cut to the speech.
    Every chunk's latents and the video's length equal the reference's."""
    tool = load_tool("make_sampler_fixture")
    tensors, meta = read_fixture(case)
    assert {k for k in tensors if k.startswith("latents")} == {f"latents{i}" for i in range(chunks)}
    expected = [tensors[f"latents{i}"] for i in range(chunks)]
    video_frames = int(meta["video_frames"])
    source = tensors.get("source_mp4")
    image, audio = tool.make_media(tmp_path, case)
    if source is not None:  # dubbing: the very MP4 the reference rendered from (see the tool)
        image.write_bytes(source.numpy().tobytes())
    result, captured = render_capturing(
        plain_pipe, tool.request_for(image, audio, case), tmp_path / "out.mp4"
    )
    assert result.num_frames == video_frames  # the reference's output length
    assert len(captured) == chunks
    for i, (ours, ref) in enumerate(zip(captured, expected, strict=True)):
        print(f"{case} chunk {i + 1}: max |ours - reference| = {(ours - ref).abs().max():.3e}")
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
