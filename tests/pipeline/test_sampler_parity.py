"""Sampler parity: each chunk's latents equal the reference's loop (tools/parity/make_sampler_fixture.py).

Same tiny weights (seed 0), same media, same seed, hence the same initial noise (the reference
seeds the global CPU generator, the pipeline its own generator with the same seed); the
fixtures hold the latents the reference handed to its VAE decoder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline import InfiniteTalkPipeline

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "parity"


def _tool():
    spec = importlib.util.spec_from_file_location(
        "make_sampler_fixture", ROOT / "tools/parity/make_sampler_fixture.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plain_pipe(tiny_weights_dir: Path) -> InfiniteTalkPipeline:
    return InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32, lora=None)


def _render_capturing(pipe: InfiniteTalkPipeline, request, tmp_path: Path):  # noqa: ANN001, ANN202
    """Render `request`; returns (result, the latents of each chunk as handed to the VAE decoder)."""
    captured: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def capture(latents: torch.Tensor) -> torch.Tensor:
        captured.append(latents.clone())
        return decode(latents)

    pipe.vae.decode = capture
    try:
        result = pipe.generate(request, tmp_path / "out.mp4")
    finally:
        pipe.vae.decode = decode
    return result, captured


@pytest.mark.parametrize("case", ["sampler_3pass", "sampler_2pass", "sampler_apg_3pass", "sampler_apg_2pass"])
def test_one_chunk_latents_equal_the_reference_loop(plain_pipe, tmp_path: Path, case: str) -> None:
    tool = _tool()
    with safe_open(str(FIXTURES / f"{case}.safetensors"), framework="pt") as f:
        expected = f.get_tensor("latents")
        meta = f.metadata()
    steps, shift, text_scale, audio_scale = tool.CASES[case]
    assert (int(meta["steps"]), float(meta["text_scale"])) == (steps, text_scale)
    image, audio = tool.make_media(tmp_path, case)
    calls = plain_pipe.dit_calls
    _, (latents,) = _render_capturing(plain_pipe, tool.request_for(image, audio, case), tmp_path)
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
    tool = _tool()
    with safe_open(str(FIXTURES / f"{case}.safetensors"), framework="pt") as f:
        assert {k for k in f.keys() if k.startswith("latents")} == {f"latents{i}" for i in range(chunks)}
        expected = [f.get_tensor(f"latents{i}") for i in range(chunks)]
        video_frames = int(f.metadata()["video_frames"])
        source = f.get_tensor("source_mp4") if "source_mp4" in f.keys() else None
    image, audio = tool.make_media(tmp_path, case)
    if source is not None:  # dubbing: the very MP4 the reference rendered from (see the tool)
        image.write_bytes(source.numpy().tobytes())
    result, captured = _render_capturing(plain_pipe, tool.request_for(image, audio, case), tmp_path)
    assert result.num_frames == video_frames  # the reference's output length
    assert len(captured) == chunks
    for i, (ours, ref) in enumerate(zip(captured, expected, strict=True)):
        print(f"{case} chunk {i + 1}: max |ours - reference| = {(ours - ref).abs().max():.3e}")
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
