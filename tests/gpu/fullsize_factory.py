"""A `pipeline_factory` for the GPU daemon test: the real InfiniteTalkPipeline with full-size
random weights (DiT 14B + audio modules in fp8, umT5-XXL, CLIP ViT-H, the Wan VAE, wav2vec2-base)
built on the GPU, no weight files. The tokenizer and the wav2vec2 feature extractor come from
the tiny weights folder the daemon writes (`weights_dir`); the memory plan comes from
`[performance] gpu_memory_gib` exactly as in `InfiniteTalkPipeline.from_weights`.

    pipeline_factory = "tests.gpu.fullsize_factory:build"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def build(config: Any) -> Any:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from pipeline.bench import build_random_clip, build_random_dit, build_random_t5, build_random_vae
    from pipeline.config import DiTConfig, ModelConfig, load_model_config
    from pipeline.fp8 import to_fp8
    from pipeline.models.clip import ClipConfig
    from pipeline.models.t5 import T5Config, TextEncoder, load_t5
    from pipeline.models.vae import VAEConfig
    from pipeline.models.wav2vec import AudioEncoder, Wav2VecConfig, load_wav2vec
    from pipeline.pipeline import InfiniteTalkPipeline, measured_dit_sizes, plan_memory
    from pipeline.placement import resolve_budget

    device = torch.device("cuda")
    tiny = load_model_config(config.weights_dir)
    cfg = ModelConfig(
        dit=DiTConfig(), vae=VAEConfig(), t5=T5Config(), clip=ClipConfig(), wav2vec2=Wav2VecConfig()
    )
    dit = build_random_dit(cfg.dit, device, torch.bfloat16, 0)
    to_fp8(dit)
    vae = build_random_vae(cfg.vae, device, 0)
    t5 = TextEncoder(
        build_random_t5(cfg.t5, torch.device("cpu"), torch.bfloat16, 0),
        load_t5(config.weights_dir, tiny.t5).tokenizer,
        cfg.t5,
    )
    clip = build_random_clip(cfg.clip, torch.device("cpu"), torch.float16, 0)
    tiny_audio = load_wav2vec(config.weights_dir, tiny.wav2vec2)
    wav = Wav2Vec2Model(Wav2Vec2Config(hidden_size=768, num_hidden_layers=12)).eval().requires_grad_(False)
    audio = AudioEncoder(wav, tiny_audio.extractor, cfg.wav2vec2)
    pipe = InfiniteTalkPipeline(
        config=cfg,
        weights_dir=config.weights_dir,
        dit=dit,
        vae=vae,
        text_encoder=t5,
        image_encoder=clip,
        audio_encoder=audio,
        device=device,
        dtype=torch.bfloat16,
        loras=(),
        lora_scale=1.0,
        quant="fp8",
        attention=config.attention,
    )
    perf = dict(config.perf)
    budget = resolve_budget(device, perf.get("gpu_memory_gib", "auto"), max_running=config.max_running)
    assert budget is not None
    placement = plan_memory(cfg, budget, measured_dit_sizes(dit), (vae, t5.model, clip.model, wav))
    pipe.place(dataclasses.replace(placement, quant="fp8"))
    torch.cuda.empty_cache()
    pipe.apply_perf(None)
    return pipe
