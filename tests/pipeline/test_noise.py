"""Where the noise is drawn (issue 14): `noise = "portable"` (CPU generator, the default) or
`"reference"` (the render device, as the reference draws it on the GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from daemon.config import load_settings
from daemon.jobs import InvalidJob, JobDefaults, JobSpec, parse_job
from pipeline.noise import noise_generator


def _job(tmp_path: Path, **extra: object) -> bytes:
    for name in ("face.png", "voice.wav"):
        (tmp_path / name).write_bytes(b"x" * 16)
    doc = {"prompt": "a man talks", "cond_video": "face.png", "cond_audio": {"person1": "voice.wav"}, **extra}
    return json.dumps(doc).encode()


def test_portable_is_a_cpu_generator_on_any_device() -> None:
    gen = noise_generator("portable", 7, "cpu")
    assert gen.device.type == "cpu"
    assert torch.equal(
        torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    )


def test_reference_on_a_cpu_device_is_the_portable_stream() -> None:
    a, b = noise_generator("reference", 9, "cpu"), noise_generator("portable", 9, "cpu")
    assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))


def test_an_unknown_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'gpu'"):
        noise_generator("gpu", 0, "cpu")  # type: ignore[arg-type]


def test_job_key_and_config_default_reach_the_request(tmp_path: Path) -> None:
    spec = parse_job(_job(tmp_path), base_dir=tmp_path, defaults=JobDefaults())
    assert spec.noise == "portable" and spec.to_request(tmp_path).noise == "portable"
    spec = parse_job(_job(tmp_path, noise="reference"), base_dir=tmp_path, defaults=JobDefaults())
    assert spec.to_request(tmp_path).noise == "reference"
    assert JobSpec.from_dict(json.loads(spec.to_json())).noise == "reference"
    with pytest.raises(InvalidJob) as info:
        parse_job(_job(tmp_path, noise="cuda"), base_dir=tmp_path, defaults=JobDefaults())
    assert info.value.code == "bad_value" and info.value.field == "noise"

    config = tmp_path / "infinitetalk.toml"
    config.write_text('[defaults]\nnoise = "reference"\n')
    defaults = load_settings(config).job_defaults()
    assert parse_job(_job(tmp_path), base_dir=tmp_path, defaults=defaults).noise == "reference"


def test_a_spec_stored_before_the_key_existed_loads_as_portable(tmp_path: Path) -> None:
    data = json.loads(parse_job(_job(tmp_path), base_dir=tmp_path, defaults=JobDefaults()).to_json())
    del data["noise"]
    assert JobSpec.from_dict(data).noise == "portable"


@pytest.mark.gpu
def test_reference_noise_is_the_references_cuda_stream() -> None:
    """The reference seeds the global generators, then per chunk draws `randn(16, f, h, w)` on the
    GPU and, for later chunks, 1 + steps motion draws `randn_like(motion)`; a CUDA generator seeded
    the same way draws exactly those numbers in that order."""
    seed, steps, shape, motion = 1234, 4, (16, 21, 56, 112), (16, 3, 56, 112)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    expected = [torch.randn(*shape, dtype=torch.float32, device="cuda")]
    expected += [torch.randn_like(torch.empty(motion, device="cuda")) for _ in range(1 + steps)]
    expected.append(torch.randn(*shape, dtype=torch.float32, device="cuda"))
    gen = noise_generator("reference", seed, "cuda")
    got = [torch.randn(*shape, generator=gen, dtype=torch.float32, device=gen.device)]
    got += [
        torch.randn(*motion, generator=gen, dtype=torch.float32, device=gen.device) for _ in range(1 + steps)
    ]
    got.append(torch.randn(*shape, generator=gen, dtype=torch.float32, device=gen.device))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    portable = torch.randn(*shape, generator=noise_generator("portable", seed, "cuda"))
    assert not torch.equal(portable.cuda(), expected[0])  # why the portable default differs on a GPU


@pytest.mark.gpu
def test_the_chunk_loop_draws_on_the_gpu_with_reference_noise(tiny_weights_dir: Path, tmp_path: Path) -> None:
    from pipeline import guidance, sampler
    from pipeline.pipeline import InfiniteTalkPipeline, _Reporter
    from tests.pipeline.test_gpu_chunks import _prepared

    pipe = InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cuda", dtype=torch.bfloat16)
    prepared, _ = _prepared(pipe, 1, tmp_path)
    req, seg = prepared.request, prepared.segments[0]
    context, context_null = (
        c[None] for c in pipe.text_encoder.encode_text([req.prompt, req.negative_prompt])
    )
    steps = sampler.timesteps(req.sample_steps, 2.0).to(pipe.device)
    passes = guidance.passes(req.sample_text_guide_scale, req.sample_audio_guide_scale)
    cond = pipe._reference_frame(prepared, None, 0)
    latents = {}
    with torch.inference_mode():
        for mode in ("portable", "reference", "reference"):
            gen = noise_generator(mode, req.seed, pipe.device)  # type: ignore[arg-type]
            latents.setdefault(mode, []).append(
                pipe._denoise_chunk(
                    prepared,
                    seg,
                    0,
                    cond,
                    None,
                    context,
                    context_null,
                    steps,
                    passes,
                    gen,
                    _Reporter(None, 1, req.sample_steps, 0),
                    0,
                    None,
                    {},
                )  # fmt: skip
            )
            assert gen.device.type == ("cpu" if mode == "portable" else "cuda")
    assert torch.equal(latents["reference"][0], latents["reference"][1])
    assert not torch.equal(latents["reference"][0], latents["portable"][0])
