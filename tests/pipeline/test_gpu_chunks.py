"""The chunk loop on CUDA in bf16 (tiny weights), without the media stack: two chunks of one
speaker (2 passes) and one chunk of two speakers (3 passes), checked against the fp32 CPU loop.

Needs only torch, transformers and safetensors, so it also runs on a bare GPU image:
`python -m pytest tests/pipeline/test_gpu_chunks.py --gpu`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import color, guidance, sampler
from pipeline.pipeline import InfiniteTalkPipeline, Prepared, Segment, _Reporter, speaker_masks
from pipeline.types import GenerationRequest
from pipeline.windows import plan_chunks


def _prepared(pipe: InfiniteTalkPipeline, speakers: int, tmp: Path) -> tuple[Prepared, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    h, w = pipe.config.buckets["infinitetalk-480"][0]
    first = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
    rows = 60
    wc = pipe.config.wav2vec2
    features = tuple(torch.randn(rows, wc.num_layers, wc.hidden_size, generator=gen) for _ in range(speakers))
    plan = plan_chunks(
        rows, frame_num=pipe.config.generation.frame_num, motion_frame=9, max_frame_num=None, mode="streaming"
    )
    request = GenerationRequest(
        prompt="a person talks",
        negative_prompt="blurry",
        cond_media=tmp / "x.png",
        audio=(tmp / "a.wav",) * speakers,
        sample_steps=2,
        seed=5,
        sample_text_guide_scale=1.0 if speakers == 1 else 4.0,
        sample_audio_guide_scale=2.0,
    )
    masks = speaker_masks(h, w, None, (h, w)) if speakers == 2 else None
    prepared = Prepared(
        request=request,
        target=(h, w),
        segments=(Segment(start=0, plan=plan, features=features),),
        total_frames=plan.total_frames,
        num_speakers=speakers,
        is_video=False,
        source_fps=25.0,
        first_frame=np.ascontiguousarray(first),
        masks=masks,
        audio_wav=tmp / "a.wav",
        work_dir=tmp,
    )
    return prepared, torch.from_numpy(first)


def _run_chunks(pipe: InfiniteTalkPipeline, prepared: Prepared, chunks: int) -> list[torch.Tensor]:
    req = prepared.request
    seg = prepared.segments[0]
    context, context_null = (
        c[None] for c in pipe.text_encoder.encode_text([req.prompt, req.negative_prompt])
    )
    steps = sampler.timesteps(req.sample_steps, 2.0).to(pipe.device)
    passes = guidance.passes(req.sample_text_guide_scale, req.sample_audio_guide_scale)
    gen = torch.Generator().manual_seed(req.seed)
    cond = pipe._reference_frame(prepared, None, 0)
    motion, out, cache = None, [], {}
    for k in range(chunks):
        latent = pipe._denoise_chunk(
            prepared,
            seg,
            seg.plan.starts[k],
            cond,
            motion,
            context,
            context_null,
            steps,
            passes,
            gen,
            _Reporter(None, chunks, req.sample_steps, 0),
            k,
            None,
            cache,
        )
        video = color.match_colors(pipe.vae.decode(latent), cond, 1.0)
        motion = video[:, -9:].float().cpu()
        out.append(video.float().cpu())
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("speakers", [1, 2])
def test_chunk_loop_cuda_bf16_close_to_cpu_fp32(
    tiny_weights_dir: Path, tmp_path: Path, speakers: int
) -> None:
    cpu = InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32)
    gpu = InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cuda", dtype=torch.bfloat16)
    variant = "multi" if speakers == 2 else "single"
    chunks = 2 if speakers == 1 else 1
    results = []
    for pipe in (cpu, gpu):
        pipe._use_variant(variant)
        prepared, _ = _prepared(pipe, speakers, tmp_path)
        with torch.inference_mode():
            results.append(_run_chunks(pipe, prepared, chunks))
    for ref, got in zip(*results, strict=True):
        assert got.shape == ref.shape and torch.isfinite(got).all()
        err = (got - ref).abs().mean().item()
        print(f"{speakers} speaker(s): mean |cuda bf16 - cpu fp32| = {err:.4f} (pixels in [-1, 1])")
        assert err < 0.1
