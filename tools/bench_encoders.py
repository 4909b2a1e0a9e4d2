"""Time the encoders at full size with random weights on one GPU (CUDA events, warm-up first).

    python tools/bench_encoders.py [--tiny] [--out results.json]

VAE: decode 21 latent frames -> 81 frames and encode 81 / 9 frames at 480x832 (the reference
baseline's shape), in float32 (the reference's precision), bfloat16, and bfloat16 channels-last;
plus the bf16 drift against float32 on the same random weights. CLIP: one image, fp16. T5: two
512-token prompts, bf16. wav2vec2 (base size): 60 s of audio on the GPU and on the CPU.
Random weights make the timings real and the drift figures only indicative.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import clip, t5, vae  # noqa: E402


def timed(fn, device: torch.device, runs: int = 2) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_init(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> torch.nn.Module:
    gen = torch.Generator(device=device).manual_seed(seed)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "norm" in name or name.endswith("gamma"):
                p.fill_(1.0) if ("norm" in name or name.endswith("gamma")) and p.ndim >= 1 else p.zero_()
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
    return model.to(dtype).eval().requires_grad_(False)


def bench_vae(device: torch.device, tiny: bool) -> dict:
    cfg = vae.VAEConfig(base_dim=8) if tiny else vae.VAEConfig()
    h, w, f = (32, 48, 9) if tiny else (480, 832, 81)
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(16, (f - 1) // 4 + 1, h // 8, w // 8, device=device, generator=gen)
    video = (torch.rand(3, f, h, w, device=device, generator=gen) * 2 - 1).clamp(-1, 1)
    with torch.device("meta"):
        model = vae.WanVAE(cfg)
    model = random_init(model, device, torch.float32)
    results: dict = {}
    ref_dec = ref_enc = None
    for label, dtype, cl in (
        ("fp32", torch.float32, False),
        ("bf16", torch.bfloat16, False),
        ("bf16_cl", torch.bfloat16, True),
    ):
        m = model.to(dtype)
        m.channels_last = False
        if cl:
            m.use_channels_last()
        t_dec, dec = timed(lambda m=m: m.decode(latents), device)
        if device.type == "cuda":  # peak of one more call, after cuDNN's autotuning trials
            torch.cuda.reset_peak_memory_stats()
            m.decode(latents)
        peak_dec = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        t_enc, enc = timed(lambda m=m: m.encode(video), device)
        t_enc9, _ = timed(lambda m=m: m.encode(video[:, :9]), device)
        if ref_dec is None:
            ref_dec, ref_enc = dec, enc
        results[label] = {
            "decode_s": round(t_dec, 3), "encode81_s": round(t_enc, 3), "encode9_s": round(t_enc9, 3),
            "decode_peak_gib": round(peak_dec, 2),
            "decode_rel_err_vs_fp32": rel(dec, ref_dec), "encode_rel_err_vs_fp32": rel(enc, ref_enc),
        }  # fmt: skip
        print("vae", label, results[label], flush=True)
        model = m.float()
        for p in model.parameters():
            p.data = p.data.contiguous()
    return results


def bench_clip(device: torch.device, tiny: bool) -> dict:
    from transformers import CLIPVisionModel

    cfg = clip.ClipConfig(dim=32, num_heads=2, num_layers=3) if tiny else clip.ClipConfig()
    with torch.device("meta"):
        model = CLIPVisionModel(clip._hf_config(cfg))
    model = random_init(model, device, torch.float16)
    for module in model.modules():  # to_empty left the position ids uninitialised
        if "position_ids" in dict(module.named_buffers(recurse=False)):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1], device=device))
    enc = clip.ImageEncoder(model, cfg)
    frame = torch.rand(1, 3, 480, 832, device=device) * 2 - 1
    t, out = timed(lambda: enc.encode_image_clip(frame), device)
    print("clip", t, tuple(out.shape), flush=True)
    return {"encode_s": round(t, 4)}


def bench_t5(device: torch.device, tiny: bool) -> dict:
    from transformers import UMT5EncoderModel

    cfg = (
        t5.T5Config(vocab_size=300, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
        if tiny
        else t5.T5Config()
    )
    with torch.device("meta"):
        model = UMT5EncoderModel(t5._hf_config(cfg))
    model = random_init(model, device, torch.bfloat16)
    model.encoder.embed_tokens = model.shared
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device=device)
    mask = torch.ones_like(ids)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    t, out = timed(run, device)
    print("t5", t, tuple(out.shape), flush=True)
    return {"two_prompts_512_s": round(t, 4)}


def bench_wav2vec(device: torch.device, tiny: bool) -> dict:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from pipeline.models.wav2vec import AudioEncoder, Wav2VecConfig

    hub = (
        Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
        if tiny
        else Wav2Vec2Config()
    )

    class Identity:
        def __call__(self, x, sampling_rate):  # noqa: ANN001
            return type("Out", (), {"input_values": [x]})()

    results = {}
    for where in ("cpu", device.type):
        dev = torch.device(where)
        model = Wav2Vec2Model(hub).to(dev).eval()
        enc = AudioEncoder(
            model, Identity(), Wav2VecConfig(hidden_size=hub.hidden_size, num_layers=hub.num_hidden_layers)
        )
        speech = torch.randn(16000 * 60).numpy() * 0.1
        t, out = timed(lambda enc=enc, speech=speech: enc.audio_features(speech), dev, runs=1)
        print("wav2vec", where, t, tuple(out.shape), flush=True)
        results[f"{where}_60s_audio_s"] = round(t, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="+", default=["vae", "clip", "t5", "wav2vec2"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    print(info, flush=True)
    results = {"info": info}
    parser_only = {"vae": bench_vae, "clip": bench_clip, "t5": bench_t5, "wav2vec2": bench_wav2vec}
    for name, fn in ((n, parser_only[n]) for n in args.only):
        results[name] = fn(device, args.tiny)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
