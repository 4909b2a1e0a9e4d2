"""Run the REFERENCE InfiniteTalk DiT (MeiGen-AI/InfiniteTalk checkout) on the CPU and store fixtures.

    python tools/parity/make_dit_fixtures.py [--ref /work/ref] [--out tests/fixtures/parity]

What it does:
1. writes the project's tiny weights (seed 0) into a temporary folder with `pipeline.tiny`;
2. imports the reference's `wan/modules/multitalk_model.py` and `wan/wan_lora.py` from the
   checkout at run time (nothing is copied), with shims for what a CPU machine lacks:
   xfuser (sequence-parallel getters: rank 0 of 1), xformers (`memory_efficient_attention` as
   torch SDPA on the transposed tensors), diffusers (ModelMixin -> nn.Module, no-op
   register_to_config), flash-attn (the model's `flash_attention` -> SDPA on [B, L, N, D]),
   skimage / imageio / torchvision / loguru (imported by utilities, unused by the forward);
   `torch_gc` becomes a no-op and TorchDynamo is disabled;
3. builds the reference `WanModel` at the tiny width; the reference hard-codes 12x768 wav2vec2
   features and 1280-wide CLIP features, so its `audio_proj` and `img_emb` are replaced by
   smaller instances of its own classes (`AudioProjModel`, `MLPProj`);
4. loads the tiny files the way the reference does (7 shards + the InfiniteTalk file, merged,
   `load_state_dict` strict), in float32;
5. runs one forward for one speaker (single weights) and two speakers (multi weights, region
   masks), and one forward after merging the tiny LoRA with the reference's `WanLoraWrapper`
   (scale 1.2, float32 on the CPU), and saves inputs + outputs as safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.parity.common import fixture_args  # noqa: E402
from tools.parity.common import module as _module  # noqa: E402

SEED = 0
LORA_SCALE = 1.2
# latent grid of the fixtures: 3 latent frames (9 audio frames), 6 x 8 latents -> 3 x 4 tokens
LATENT = (3, 6, 8)
TEXT_TOKENS = 7


def _package(name: str, path: Path) -> None:
    mod = _module(name)
    mod.__path__ = [str(path)]  # a namespace for the submodules, without running __init__.py


def _sdpa_blmd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on [B, L, N, D] tensors (xformers / flash-attn layout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def install_shims(ref: Path) -> None:
    _module("xfuser")
    _module("xfuser.core")
    _module(
        "xfuser.core.distributed",
        get_sequence_parallel_rank=lambda: 0,
        get_sequence_parallel_world_size=lambda: 1,
        get_sp_group=lambda: None,
    )

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):  # noqa: ANN001, ANN202
        if attn_bias is not None:
            raise NotImplementedError("attention bias is only used for sequence parallelism")
        return _sdpa_blmd(q, k, v)

    xformers = _module("xformers")
    xformers.ops = _module("xformers.ops", memory_efficient_attention=memory_efficient_attention)

    class ConfigMixin:  # plain base: inference needs no config registry
        pass

    _module("diffusers", ModelMixin=torch.nn.Module)
    _module("diffusers.configuration_utils", ConfigMixin=ConfigMixin, register_to_config=lambda f: f)
    for name in ("imageio", "torchvision", "skimage"):
        if importlib.util.find_spec(name) is None:
            _module(name)
            if name == "skimage":
                sys.modules["skimage"].color = _module("skimage.color")
    if importlib.util.find_spec("loguru") is None:
        import logging

        _module("loguru", logger=logging.getLogger("reference"))
    _package("wan", ref / "wan")
    _package("wan.modules", ref / "wan" / "modules")
    _package("wan.utils", ref / "wan" / "utils")


def import_reference(ref: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    install_shims(ref)
    import importlib

    utils = importlib.import_module("wan.utils.multitalk_utils")
    utils.torch_gc = lambda: None
    model_mod = importlib.import_module("wan.modules.multitalk_model")

    def flash_attention(q, k, v, q_lens=None, k_lens=None, window_size=(-1, -1), **_: object):  # noqa: ANN001, ANN202
        return _sdpa_blmd(q, k, v.to(q.dtype)).to(q.dtype)

    model_mod.flash_attention = flash_attention
    spec = importlib.util.spec_from_file_location("wan.wan_lora", ref / "wan" / "wan_lora.py")
    lora_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lora_mod)
    return model_mod, utils, lora_mod


#: the reference `WanModel`'s settings that are `DiTConfig` fields of the same name
WAN_MODEL_FIELDS = (
    "dim",
    "eps",
    "ffn_dim",
    "freq_dim",
    "in_dim",
    "num_heads",
    "num_layers",
    "out_dim",
    "text_len",
    "text_dim",
    "audio_window",
    "intermediate_dim",
    "output_dim",
    "context_tokens",
    "vae_scale",
)


def build_reference(model_mod: types.ModuleType, cfg) -> torch.nn.Module:  # noqa: ANN001
    settings = {name: getattr(cfg, name) for name in WAN_MODEL_FIELDS}
    model = model_mod.WanModel(weight_init=False, model_type="i2v", **settings)
    # the reference fixes these widths (12 x 768 wav2vec2 features, 1280-wide CLIP): shrink them
    model.audio_proj = model_mod.AudioProjModel(
        seq_len=cfg.audio_window,
        seq_len_vf=cfg.audio_window_vf,
        blocks=cfg.audio_blocks,
        channels=cfg.audio_channels,
        intermediate_dim=cfg.intermediate_dim,
        output_dim=cfg.output_dim,
        context_tokens=cfg.context_tokens,
        norm_output_audio=True,
    )
    model.img_emb = model_mod.MLPProj(cfg.clip_dim, cfg.dim)
    model.enable_teacache = False
    return model.eval().float()


def load_reference_weights(model: torch.nn.Module, weights: Path, variant: str) -> None:
    wan = weights / "Wan2.1-I2V-14B-480P"
    files = [wan / f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    files.append(weights / "InfiniteTalk" / variant / "infinitetalk.safetensors")
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_file(str(f)))
    model.load_state_dict(merged)  # strict, as the reference


def make_inputs(cfg, speakers: int, gen: torch.Generator) -> dict[str, torch.Tensor]:  # noqa: ANN001
    f, h, w = LATENT
    audio_frames = (f - 1) * cfg.vae_scale + 1
    inputs = {
        "x": torch.randn(1, cfg.out_dim, f, h, w, generator=gen),
        "t": torch.tensor([873.25]),
        "context": torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=gen),
        "clip_fea": torch.randn(1, cfg.clip_tokens, cfg.clip_dim, generator=gen),
        "y": torch.randn(1, cfg.in_dim - cfg.out_dim, f, h, w, generator=gen),
        "audio": torch.randn(
            1, speakers, audio_frames, cfg.audio_window, cfg.audio_blocks, cfg.audio_channels, generator=gen
        ),
    }
    masks = torch.zeros(3, h, w)
    if speakers == 2:  # person 1 left, person 2 right, both leaving a top row, background the rest
        masks[0, 1:, : w // 2] = 1
        masks[1, 1:, w // 2 :] = 1
        masks[2] = 1 - masks[0] - masks[1]
    else:  # the reference builds all-ones masks for one speaker
        masks[:] = 1
    inputs["ref_target_masks"] = masks
    return inputs


def run_reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    f, h, w = LATENT
    seq_len = f * (h // 2) * (w // 2)
    with torch.no_grad():
        out = model(
            [inputs["x"][0]],
            inputs["t"],
            [inputs["context"][0]],
            seq_len,
            clip_fea=inputs["clip_fea"],
            y=[inputs["y"][0]],
            audio=inputs["audio"][0],
            ref_target_masks=inputs["ref_target_masks"],
        )
    return out  # [1, 16, F, H, W]


def main() -> None:
    args = fixture_args(__doc__)
    torch.manual_seed(0)
    from pipeline.config import load_model_config
    from pipeline.tiny import write_tiny_weights
    from pipeline.weights import LORA_FILE
    from pipeline.weights_check import dit_files_digest

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # the tiny weights first: their writer uses transformers, which must not see the shims
        weights = write_tiny_weights(Path(tmp), seed=SEED)
        cfg = load_model_config(weights).dit
        model_mod, _, lora_mod = import_reference(args.ref)
        meta = {"seed": str(SEED), "dit_files_sha256": dit_files_digest(weights), "reference": str(args.ref)}
        gen = torch.Generator().manual_seed(1234)
        cases = (("dit_single", "single", 1), ("dit_multi", "multi", 2))
        for name, variant, speakers in cases:
            model = build_reference(model_mod, cfg)
            load_reference_weights(model, weights, variant)
            inputs = make_inputs(cfg, speakers, gen)
            out = run_reference(model, inputs)
            save_file(
                {**inputs, "out": out.contiguous()}, str(args.out / f"{name}.safetensors"), metadata=meta
            )
            print(f"{name}: out {tuple(out.shape)} |out| {out.abs().mean():.4f}")

        model = build_reference(model_mod, cfg)
        load_reference_weights(model, weights, "single")
        wrapper = lora_mod.WanLoraWrapper(model)
        lora_name = wrapper.load_lora(str(weights / LORA_FILE))
        wrapper.apply_lora(lora_name, LORA_SCALE, param_dtype=torch.float32, device="cpu")
        inputs = make_inputs(cfg, 1, gen)
        out = run_reference(model, inputs)
        state = model.state_dict()
        merged = {
            f"merged.{k}": state[k].contiguous()
            for k in (
                "blocks.0.ffn.0.weight",
                "blocks.1.norm3.weight",
                "blocks.0.self_attn.q.bias",
                "head.head.bias",
            )
        }
        save_file(
            {**inputs, "out": out.contiguous(), **merged},
            str(args.out / "lora.safetensors"),
            metadata={**meta, "lora_scale": str(LORA_SCALE)},
        )
        print(f"lora: out {tuple(out.shape)} |out| {out.abs().mean():.4f}")


if __name__ == "__main__":
    main()
