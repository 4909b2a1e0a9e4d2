"""Tiny random VAE, T5, CLIP and wav2vec2 weights (plus tokenizers) in the released file layout.

`write_tiny_encoders(weights_dir, seed)` writes, under `weights_dir`:

    Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth                                      float32
    Wan2.1-I2V-14B-480P/models_t5_umt5-xxl-enc-bf16.pth                     bfloat16
    Wan2.1-I2V-14B-480P/google/umt5-xxl/                                    tokenizer (Unigram, made here;
                                                                            nmt_nfkc normaliser as released)
    Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   float32, visual + textual
    Wan2.1-I2V-14B-480P/xlm-roberta-large/                                  tokenizer (Unigram, made here)
    chinese-wav2vec2-base/  config.json, preprocessor_config.json, pytorch_model.bin, model.safetensors

with the released key names and tiny shapes; every value comes from one `torch.Generator(seed)`
drawn in a fixed order (VAE, T5, CLIP, wav2vec2; keys in layout order). It returns the
hyper-parameters ("vae", "t5", "clip", "wav2vec2" sections of tiny.json), JSON-ready.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.models import clip, t5, vae, wav2vec

WAN_DIR = "Wan2.1-I2V-14B-480P"

TINY_VAE = vae.VAEConfig(base_dim=8)
TINY_CLIP = clip.ClipConfig(
    dim=32, num_heads=2, num_layers=3, embed_dim=16, text_dim=16, text_layers=1, text_max_len=40
)
TINY_WAV2VEC = wav2vec.Wav2VecConfig(hidden_size=16, num_layers=2)

# Tokenizer vocabularies: SentencePiece-style pieces ("▁" marks a word start).
_WORDS = [
    "a",
    "the",
    "is",
    "to",
    "of",
    "and",
    "in",
    "on",
    "at",
    "with",
    "man",
    "woman",
    "person",
    "people",
    "talking",
    "talks",
    "speaking",
    "camera",
    "studio",
    "bright",
    "dark",
    "light",
    "room",
    "video",
    "face",
    "smiling",
    "looking",
    "sitting",
    "standing",
    "two",
    "one",
    "singing",
    "says",
]
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()[]/&%")


def _pieces() -> list[tuple[str, float]]:
    pieces = [("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    pieces += [(f"▁{c}", -6.0) for c in _CHARS]
    pieces += [(c, -7.0) for c in _CHARS]
    return pieces


def _t5_specials() -> list[str]:
    return ["<pad>", "</s>", "<unk>"]


def _xlmr_specials() -> list[str]:
    return ["<s>", "<pad>", "</s>", "<unk>"]


def t5_vocab_size() -> int:
    return len(_t5_specials()) + len(_pieces())


def xlmr_vocab_size() -> int:
    return len(_xlmr_specials()) + len(_pieces()) + 1  # + <mask>


def nmt_nfkc_charsmap() -> bytes:
    """SentencePiece's built-in `nmt_nfkc` normalisation table (the `precompiled_charsmap` of the
    released umT5 and XLM-R tokenizers), taken from a throw-away model trained in memory."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 8),
        model_writer=model,
        model_type="char",
        vocab_size=12,
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        minloglevel=2,
    )
    # ModelProto field 3 = NormalizerSpec; its field 2 = precompiled_charsmap (bytes)
    spec = next(v for n, v in _proto_fields(model.getvalue()) if n == 3)
    charsmap = next(v for n, v in _proto_fields(bytes(spec)) if n == 2)
    if not isinstance(charsmap, bytes) or not charsmap:
        raise RuntimeError("sentencepiece wrote no precompiled_charsmap for nmt_nfkc")
    return charsmap


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of a protobuf message (varint and length-delimited
    values as int / bytes; fixed-width values as bytes)."""

    def varint(i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
            out.append((number, value))
        elif wire == 2:
            size, i = varint(i)
            out.append((number, data[i : i + size]))
            i += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, data[i : i + size]))
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
    return out


def write_unigram_tokenizer(folder: Path, *, kind: str) -> None:
    """A small Unigram tokenizer built in code and saved like the released folder (`t5` or `xlmr`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "t5":
        specials = _t5_specials()
        vocab = [(s, 0.0) for s in specials] + _pieces()
        unk, template = 2, ("$A </s>", "$A </s> $B </s>")
        post = [("</s>", 1)]
        config: dict[str, Any] = {
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": 512,
            "pad_token": "<pad>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "extra_ids": 0,
            "additional_special_tokens": [],
        }
        special_map = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif kind == "xlmr":
        specials = _xlmr_specials()
        vocab = [(s, 0.0) for s in specials] + _pieces() + [("<mask>", 0.0)]
        unk, template = 3, ("<s> $A </s>", "<s> $A </s> </s> $B </s>")
        post = [("<s>", 0), ("</s>", 2)]
        config = {
            "tokenizer_class": "XLMRobertaTokenizer",
            "model_max_length": 512,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "cls_token": "<s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
        }
        special_map = {k: v for k, v in config.items() if k.endswith("_token")}
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 't5' or 'xlmr')")
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=False))
    # the released umT5 and XLM-R files' normaliser: SentencePiece's nmt_nfkc charsmap, then runs
    # of spaces collapsed (what transformers' SentencePiece converter writes)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(nmt_nfkc_charsmap()), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=template[0], pair=template[1], special_tokens=post
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    for s in specials + (["<mask>"] if kind == "xlmr" else []):
        tok.add_special_tokens([s])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def tiny_t5_config() -> t5.T5Config:
    return t5.T5Config(
        vocab_size=t5_vocab_size() + 6, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2
    )


def tiny_clip_config() -> clip.ClipConfig:
    return dataclasses.replace(TINY_CLIP, text_vocab_size=xlmr_vocab_size())


def random_tensor(gen: torch.Generator, key: str, shape: tuple[int, ...]) -> Tensor:
    """A well-scaled random float32 tensor for a parameter, chosen by its name and shape."""
    leaf = key.rsplit(".", 1)[-1]
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if leaf == "gamma" or ("norm" in key and leaf == "weight"):
        return 1.0 + 0.1 * noise
    if leaf == "weight_g":
        return 0.5 + noise.abs()
    if leaf == "bias" or len(shape) <= 1:
        return 0.05 * noise
    if "embedding" in key or "embed" in key or leaf == "codevectors":
        return 0.5 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def random_state(
    gen: torch.Generator, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> dict[str, Tensor]:
    return {k: random_tensor(gen, k, s).to(dtype) for k, s in shapes.items()}


def wav2vec_hub_config(cfg: wav2vec.Wav2VecConfig) -> dict[str, Any]:
    """config.json in the hub's format (transformers 4.16 era keys) with tiny widths."""
    conv_dim = 16
    return {
        "architectures": ["Wav2Vec2ForPreTraining"],
        "model_type": "wav2vec2",
        "activation_dropout": 0.0,
        "apply_spec_augment": True,
        "attention_dropout": 0.1,
        "codevector_dim": 8,
        "conv_bias": False,
        "conv_dim": [conv_dim] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "do_stable_layer_norm": False,
        "feat_extract_activation": "gelu",
        "feat_extract_norm": "group",
        "feat_proj_dropout": 0.1,
        "final_dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout": 0.1,
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * cfg.hidden_size,
        "layer_norm_eps": 1e-05,
        "layerdrop": 0.1,
        "mask_time_length": 10,
        "mask_time_prob": 0.05,
        "num_attention_heads": 2,
        "num_codevector_groups": 2,
        "num_codevectors_per_group": 4,
        "num_conv_pos_embedding_groups": 4,
        "num_conv_pos_embeddings": 128,
        "num_feat_extract_layers": 7,
        "num_hidden_layers": cfg.num_layers,
        "proj_codevector_dim": 8,
        "vocab_size": 32,
    }


def wav2vec_checkpoint_shapes(hub_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys of the hub's `Wav2Vec2ForPreTraining` checkpoint (`wav2vec2.` prefix, weight-norm as g/v)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    fields = {k: v for k, v in hub_config.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = Wav2Vec2ForPreTraining(Wav2Vec2Config(**fields))
    shapes = {}
    for key, value in model.state_dict().items():
        key = key.replace("conv.parametrizations.weight.original0", "conv.weight_g")
        key = key.replace("conv.parametrizations.weight.original1", "conv.weight_v")
        shapes[key] = tuple(value.shape)
    return shapes


def write_tiny_encoders(weights_dir: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Write the tiny encoder files into `weights_dir` (module docstring); return tiny.json sections."""
    from safetensors.torch import save_file

    weights_dir = Path(weights_dir)
    wan = weights_dir / WAN_DIR
    wan.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    t5_cfg, clip_cfg = tiny_t5_config(), tiny_clip_config()

    torch.save(random_state(gen, vae.checkpoint_shapes(TINY_VAE), torch.float32), wan / vae.VAE_FILE)
    torch.save(random_state(gen, t5.checkpoint_shapes(t5_cfg), torch.bfloat16), wan / t5.T5_FILE)
    write_unigram_tokenizer(wan / t5.T5_TOKENIZER_DIR, kind="t5")
    torch.save(random_state(gen, clip.checkpoint_shapes(clip_cfg), torch.float32), wan / clip.CLIP_FILE)
    write_unigram_tokenizer(wan / clip.CLIP_TOKENIZER_DIR, kind="xlmr")

    w2v = weights_dir / wav2vec.WAV2VEC_DIR
    w2v.mkdir(parents=True, exist_ok=True)
    hub = wav2vec_hub_config(TINY_WAV2VEC)
    (w2v / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    preprocessor = {
        "do_normalize": True,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
    (w2v / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    state = random_state(gen, wav2vec_checkpoint_shapes(hub), torch.float32)
    torch.save(state, w2v / "pytorch_model.bin")
    save_file(state, str(w2v / "model.safetensors"), metadata={"format": "pt"})

    return {
        "vae": _as_json(TINY_VAE),
        "t5": _as_json(t5_cfg),
        "clip": _as_json(clip_cfg),
        "wav2vec2": _as_json(TINY_WAV2VEC),
    }


def state_digest(state: dict[str, Tensor]) -> str:
    """Short sha256 over key names, dtypes, shapes and values (independent of the file format)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()[:16]


def _as_json(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
