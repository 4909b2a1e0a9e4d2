"""Run the REFERENCE encoders (MeiGen-AI/InfiniteTalk, checked out at --ref) on the CPU on our tiny
random weights (seed 0) and store inputs + outputs as safetensors fixtures in tests/fixtures/parity/.

    PYTHONPATH=/tmp/ref-tf python tools/parity/make_encoder_fixtures.py --ref /work/ref

The reference's wav2vec2 forward reads `encoder_outputs.hidden_states`, which transformers 5 no
longer returns from the encoder, so run this with transformers 4.x first on the path (the
reference pins transformers>=4.49; we used 4.57.1 + tokenizers 0.22.1, installed with
`pip install --target /tmp/ref-tf --no-deps transformers==4.57.1 tokenizers==0.22.1 huggingface_hub==0.36.0`).

Nothing of the reference is copied: its modules are imported from --ref at run time. Shims only
stand in for imports the CPU run lacks (see docs/parity-encoders.md): `optimum.quanto` (import
only), `torchvision.transforms` (the one transform used, Normalize, is torchvision's tensor math:
(x - mean) / std per channel), and `wan.modules.attention.flash_attention` (PyTorch SDPA on the
same [B, L, N, D] layout), and `torch.cuda.current_device` while t5.py is imported (a default
argument evaluated at import). The reference's audio helpers live in its CLI script; they are taken
from that file's syntax tree (`loudness_norm`, `audio_prepare_single`, `audio_prepare_multi`,
`get_embedding`) and executed, not re-typed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline import tiny_encoders  # noqa: E402
from pipeline.models import clip, t5, vae  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity"
SEED = 0
PROMPTS = (
    "A woman is talking to the camera in a bright studio.",
    "  two   people &amp;amp; a man  singing\n\tin a dark room ",
    "Ünïcode “quotes” — and a very long prompt: " + "the man is talking " * 12,
    # characters the tokenizer's nmt_nfkc normaliser folds (transformers 5 tokenized these apart)
    "H₂O ① x² …… ｔｈｅ ﬁne man is talking",
)


# ----------------------------------------------------------------------------------------------
# shims for imports a CPU checkout lacks


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def _install_shims() -> None:
    # transformers probes installed packages when first imported: import it before the shims exist
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Model  # noqa: F401

    quanto = _module("optimum.quanto")
    for name in ("quantize", "freeze", "qint8", "requantize"):
        setattr(quanto, name, None)
    optimum = _module("optimum")
    optimum.quanto = quanto  # type: ignore[attr-defined]
    sys.modules.setdefault("optimum", optimum)
    sys.modules.setdefault("optimum.quanto", quanto)

    transforms = _module("torchvision.transforms")

    class Normalize:  # torchvision.transforms.Normalize on tensors: (x - mean) / std per channel
        def __init__(self, mean: list[float], std: list[float]) -> None:
            self.mean, self.std = mean, std

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
            return x.sub_(mean).div_(std)

    class Compose:
        def __init__(self, transforms: list[object]) -> None:
            self.transforms = transforms

    class _Unused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

    transforms.Normalize = Normalize  # type: ignore[attr-defined]
    transforms.Compose = Compose  # type: ignore[attr-defined]
    transforms.Resize = _Unused  # type: ignore[attr-defined]
    transforms.ToTensor = _Unused  # type: ignore[attr-defined]
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")  # type: ignore[attr-defined]
    torchvision = _module("torchvision")
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.setdefault("torchvision", torchvision)
    sys.modules.setdefault("torchvision.transforms", transforms)


def _load_ref_modules(ref: Path) -> dict[str, types.ModuleType]:
    """Import wan/modules/{vae,tokenizers,t5,xlm_roberta,clip}.py without running the package __init__s."""
    wan = types.ModuleType("wan")
    wan.__path__ = [str(ref / "wan")]  # type: ignore[attr-defined]
    modules_pkg = types.ModuleType("wan.modules")
    modules_pkg.__path__ = [str(ref / "wan" / "modules")]  # type: ignore[attr-defined]
    sys.modules["wan"], sys.modules["wan.modules"] = wan, modules_pkg

    attention = types.ModuleType("wan.modules.attention")

    def flash_attention(q, k, v, dropout_p=0.0, causal=False, version=None, **_: object):  # [B, L, N, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal
        )
        return out.transpose(1, 2).contiguous()

    attention.flash_attention = flash_attention  # type: ignore[attr-defined]
    sys.modules["wan.modules.attention"] = attention

    loaded = {}
    # t5.py evaluates `torch.cuda.current_device()` as a default argument at import time
    current_device, torch.cuda.current_device = torch.cuda.current_device, lambda: 0
    for name in ("vae", "tokenizers", "t5", "xlm_roberta", "clip"):
        spec = importlib.util.spec_from_file_location(
            f"wan.modules.{name}", ref / "wan" / "modules" / f"{name}.py"
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    torch.cuda.current_device = current_device
    sys.path.insert(0, str(ref))  # for `src.audio_analysis`
    from src.audio_analysis.wav2vec2 import Wav2Vec2Model  # the reference's subclass

    loaded["wav2vec2"] = types.SimpleNamespace(Wav2Vec2Model=Wav2Vec2Model)  # type: ignore[assignment]
    return loaded


def _ref_cli_functions(ref: Path, names: tuple[str, ...]) -> dict[str, object]:
    """Execute the named top-level functions of the reference CLI script (its audio helpers)."""
    import librosa
    import pyloudnorm as pyln
    from einops import rearrange

    source = (ref / "generate_infinitetalk.py").read_text()
    tree = ast.parse(source)
    picked = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {n.name for n in picked}
    if missing:
        raise SystemExit(f"reference script lacks {sorted(missing)}")
    namespace: dict[str, object] = {
        "np": np, "torch": torch, "librosa": librosa, "pyln": pyln, "rearrange": rearrange,
        "os": __import__("os"), "subprocess": subprocess,
    }  # fmt: skip
    exec(
        compile(ast.Module(body=picked, type_ignores=[]), str(ref / "generate_infinitetalk.py"), "exec"),
        namespace,
    )
    return namespace


# ----------------------------------------------------------------------------------------------


def _state_hash(path: Path) -> str:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return tiny_encoders.state_digest(load_file(str(path)))
    return tiny_encoders.state_digest(torch.load(path, map_location="cpu", weights_only=True))


def make_vae(mods: dict, weights: Path, meta: dict) -> dict[str, torch.Tensor]:
    cfg = tiny_encoders.TINY_VAE
    model = mods["vae"].WanVAE_(
        dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        attn_scales=[], temperal_downsample=list(cfg.temporal_downsample), dropout=0.0,
    )  # fmt: skip
    file = weights / "Wan2.1-I2V-14B-480P" / vae.VAE_FILE
    model.load_state_dict(torch.load(file, map_location="cpu"), strict=True)
    wrapper = mods["vae"].WanVAE.__new__(mods["vae"].WanVAE)
    wrapper.dtype, wrapper.device = torch.float, "cpu"
    wrapper.mean = torch.tensor(cfg.latent_mean)
    wrapper.std = torch.tensor(cfg.latent_std)
    wrapper.scale = [wrapper.mean, 1.0 / wrapper.std]
    wrapper.model = model.eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(1)
    video = (torch.rand(3, 9, 32, 48, generator=gen) * 2 - 1).cumsum(1) / 3  # temporally smooth
    video = video.clamp(-1, 1)
    latents_in = torch.randn(16, 3, 4, 6, generator=gen)
    with torch.no_grad():
        encoded = wrapper.encode([video])[0]
        decoded = wrapper.decode([latents_in])[0]
    meta["vae_digest"] = _state_hash(file)
    return {"video": video, "encoded": encoded, "latents": latents_in, "decoded": decoded}


def make_t5(mods: dict, weights: Path, meta: dict) -> dict[str, torch.Tensor]:
    cfg = tiny_encoders.tiny_t5_config()
    model = mods["t5"].T5Encoder(
        vocab=cfg.vocab_size, dim=cfg.dim, dim_attn=cfg.dim_attn, dim_ffn=cfg.dim_ffn,
        num_heads=cfg.num_heads, num_layers=cfg.num_layers, num_buckets=cfg.num_buckets,
        shared_pos=False, dropout=0.1,
    )  # fmt: skip
    root = weights / "Wan2.1-I2V-14B-480P"
    model.load_state_dict(torch.load(root / t5.T5_FILE, map_location="cpu"), strict=True)
    wrapper = mods["t5"].T5EncoderModel.__new__(mods["t5"].T5EncoderModel)
    wrapper.model = model.float().eval().requires_grad_(False)
    wrapper.text_len = cfg.text_len
    wrapper.tokenizer = mods["tokenizers"].HuggingfaceTokenizer(
        name=str(root / t5.T5_TOKENIZER_DIR), seq_len=cfg.text_len, clean="whitespace"
    )
    ids, mask = wrapper.tokenizer(list(PROMPTS), return_mask=True, add_special_tokens=True)
    with torch.no_grad():
        outputs = wrapper(list(PROMPTS), torch.device("cpu"))
    meta["t5_prompts"] = json.dumps(PROMPTS)
    meta["t5_digest"] = _state_hash(root / t5.T5_FILE)
    tensors = {f"out{i}": o.float() for i, o in enumerate(outputs)}
    for i in range(len(PROMPTS)):
        tensors[f"ids{i}"] = ids[i][mask[i].bool()]
    return tensors


def make_clip(mods: dict, weights: Path, meta: dict) -> dict[str, torch.Tensor]:
    cfg = tiny_encoders.tiny_clip_config()
    model = mods["clip"].XLMRobertaCLIP(
        embed_dim=cfg.embed_dim, image_size=cfg.image_size, patch_size=cfg.patch_size, vision_dim=cfg.dim,
        vision_mlp_ratio=cfg.mlp_ratio, vision_heads=cfg.num_heads, vision_layers=cfg.num_layers,
        vision_pool="token", activation="gelu", vocab_size=cfg.text_vocab_size, max_text_len=cfg.text_max_len,
        type_size=1, pad_id=1, text_dim=cfg.text_dim, text_heads=2, text_layers=cfg.text_layers,
        text_post_norm=True, text_dropout=0.1, attn_dropout=0.0, proj_dropout=0.0, embedding_dropout=0.0,
    )  # fmt: skip
    file = weights / "Wan2.1-I2V-14B-480P" / clip.CLIP_FILE
    model.load_state_dict(torch.load(file, map_location="cpu"), strict=True)
    wrapper = mods["clip"].CLIPModel.__new__(mods["clip"].CLIPModel)
    wrapper.model, wrapper.dtype = model.eval().requires_grad_(False), torch.float32
    wrapper.transforms = sys.modules["torchvision.transforms"].Compose(
        [sys.modules["torchvision.transforms"].Normalize(mean=list(clip.CLIP_MEAN), std=list(clip.CLIP_STD))]
    )
    gen = torch.Generator().manual_seed(2)
    image = (
        torch.rand(1, 3, 1, 40, 56, generator=gen) * 2 - 1
    )  # [B, 3, F=1, H, W], as generate_infinitetalk passes
    with torch.no_grad():
        out = wrapper.visual(image.clone())
    meta["clip_digest"] = _state_hash(file)
    return {"image": image[:, :, 0], "out": out.float()}


def _speech_like(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    voice = sum(
        np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / k for k, f in enumerate((140, 280, 420, 900), 1)
    )
    signal = 0.2 * envelope * voice + 0.01 * rng.standard_normal(t.shape)
    stereo = np.stack([signal * (1.0 - 0.3 * c) for c in range(channels)], axis=1)
    return np.round(np.clip(stereo, -1, 1) * 32767).astype(np.int16)  # [n, channels]


def make_audio(ref: Path, weights: Path, meta: dict) -> dict[str, torch.Tensor]:
    import soundfile
    from transformers import Wav2Vec2FeatureExtractor

    fns = _ref_cli_functions(
        ref, ("loudness_norm", "audio_prepare_single", "audio_prepare_multi", "get_embedding")
    )
    Wav2Vec2Model = sys.modules["src.audio_analysis.wav2vec2"].Wav2Vec2Model
    folder = weights / "chinese-wav2vec2-base"
    # the reference's forward sets config.output_attentions, which transformers >= 4.48 only allows
    # with eager attention (the known patch for recent transformers; same math)
    encoder = Wav2Vec2Model.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager"
    ).eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)

    raw1 = _speech_like(1.5, 22050, 2, seed=3)  # person 1: 22.05 kHz stereo WAV
    raw2 = _speech_like(1.2, 44100, 1, seed=4)  # person 2: 44.1 kHz mono FLAC
    with tempfile.TemporaryDirectory() as tmp:
        p1, p2 = Path(tmp) / "p1.WAV", Path(tmp) / "p2.flac"
        soundfile.write(p1, raw1, 22050, subtype="PCM_16", format="WAV")
        soundfile.write(p2, raw2, 44100, subtype="PCM_16", format="FLAC")
        single = fns["audio_prepare_single"](str(p1))
        para1, para2, para_mix = fns["audio_prepare_multi"](str(p1), str(p1), "para")
        add1, add2, add_mix = fns["audio_prepare_multi"](str(p1), str(p2), "add")
    with torch.no_grad():
        emb_single = fns["get_embedding"](single, extractor, encoder)
        emb_add1 = fns["get_embedding"](add1, extractor, encoder)
        emb_add2 = fns["get_embedding"](add2, extractor, encoder)
    meta["wav2vec_digest"] = _state_hash(folder / "model.safetensors")

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x))

    return {
        "raw1": t(raw1), "raw2": t(raw2),
        "single": t(single.astype(np.float32)),
        "para_mix": t(para_mix.astype(np.float32)),
        "add1": t(add1.astype(np.float32)), "add2": t(add2.astype(np.float32)),
        "add_mix": t(add_mix.astype(np.float32)),
        "emb_single": emb_single.float(), "emb_add1": emb_add1.float(), "emb_add2": emb_add2.float(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", type=Path, default=Path("/work/ref"), help="InfiniteTalk checkout")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--only", nargs="+", choices=("vae", "t5", "clip", "audio"), help="write only these fixtures"
    )
    args = parser.parse_args()
    from safetensors.torch import save_file

    _install_shims()
    mods = _load_ref_modules(args.ref)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(
            ["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        tiny_encoders.write_tiny_encoders(weights, seed=SEED)
        for name, make in (
            ("vae", lambda m: make_vae(mods, weights, m)),
            ("t5", lambda m: make_t5(mods, weights, m)),
            ("clip", lambda m: make_clip(mods, weights, m)),
            ("audio", lambda m: make_audio(args.ref, weights, m)),
        ):
            if args.only and name not in args.only:
                continue
            meta = {"seed": str(SEED), "reference_commit": commit, "transformers": transformers.__version__}
            tensors = {k: v.contiguous() for k, v in make(meta).items()}
            path = args.out / f"encoders_{name}.safetensors"
            save_file(tensors, str(path), metadata=meta)
            print(f"{path}: {path.stat().st_size / 1e3:.0f} kB, {sorted(tensors)}")


if __name__ == "__main__":
    main()
