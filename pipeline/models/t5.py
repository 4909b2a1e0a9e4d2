"""umT5-XXL text encoder (`models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/tokenizer.json`).

Shape legend
    B prompts · L tokens of one prompt (real length, EOS included, <= text_len = 512)
    D model width (4096) · N heads (64)
    encode_text(prompts) -> one [L_i, D] tensor per prompt, trimmed to its real length.
    The DiT zero-pads each to text_len before its text embedding (trim-then-pad, as the reference).

The network is transformers' `UMT5EncoderModel` (per-layer relative position bias, unscaled
attention, gated-GELU(tanh) feed-forward, RMS pre-norm in float32): the same math as Wan's own T5
module. The released file uses Wan's key names; `wan_to_hf_key` maps each of them onto the
transformers name at load time, and loading fails unless every tensor of the file is used and
every parameter of the model is filled (`map_state_dict`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.models.released import check_mapping, expected_shapes, load_pth

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"

_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class T5Config:
    """umT5 encoder hyper-parameters; defaults are umT5-XXL as Wan ships it."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn={self.dim_attn} is not divisible by num_heads={self.num_heads}")


def checkpoint_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Every key of the released T5 `.pth` (Wan names) with its shape; all bfloat16 in the release."""
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (cfg.dim,),
            p + "attn.q.weight": (cfg.dim_attn, cfg.dim),
            p + "attn.k.weight": (cfg.dim_attn, cfg.dim),
            p + "attn.v.weight": (cfg.dim_attn, cfg.dim),
            p + "attn.o.weight": (cfg.dim, cfg.dim_attn),
            p + "norm2.weight": (cfg.dim,),
            p + "ffn.gate.0.weight": (cfg.dim_ffn, cfg.dim),
            p + "ffn.fc1.weight": (cfg.dim_ffn, cfg.dim),
            p + "ffn.fc2.weight": (cfg.dim, cfg.dim_ffn),
            p + "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
        }
    shapes["norm.weight"] = (cfg.dim,)
    return shapes


def wan_to_hf_key(key: str) -> str:
    """Map one Wan T5 key to the `UMT5EncoderModel` parameter name; KeyError for an unknown key."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    match = _BLOCK_RE.fullmatch(key)
    if match is None or match.group(2) not in _BLOCK_KEYS:
        raise KeyError(key)
    return f"encoder.block.{match.group(1)}.{_BLOCK_KEYS[match.group(2)]}"


def map_state_dict(
    state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str
) -> dict[str, Tensor]:
    """Rename Wan keys to transformers keys; raise naming every unmapped, missing or mis-shaped tensor."""
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        try:
            mapped[wan_to_hf_key(key)] = tensor
        except KeyError:
            unknown.append(key)
    filled = set(mapped) | {"encoder.embed_tokens.weight"}  # tied to shared.weight
    check_mapping(
        source, "T5 weights do not match T5Config", mapped, expected, unmapped=unknown, filled=filled
    )
    return mapped


def clean_prompt(text: str) -> str:
    """The reference's prompt cleaning: ftfy, HTML unescape twice, whitespace collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _hf_config(cfg: T5Config) -> Any:  # a transformers.UMT5Config
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Token ids [B, L] (int64, padded to the longest) and their attention mask [B, L] (1 = real)."""

    input_ids: Tensor
    attention_mask: Tensor


class PromptTokenizer:
    """The folder's `tokenizer.json`, run by the `tokenizers` library exactly as written.

    transformers 4 runs the file as written too (the reference's ids); transformers 5 rebuilds
    a T5 tokenizer from its class template instead (another pre-tokenizer, only a `Precompiled`
    normaliser kept), so characters NFKC folds (`①`, `²`, `H₂O`, `……`) would tokenize
    differently there. Reading the file ourselves gives the reference's ids under any version.
    Post-processing (EOS) and truncation to `max_length` (EOS kept) are the file's own.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.max_length = max_length
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad is None else int(pad)

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return TokenBatch(input_ids=input_ids, attention_mask=mask)


class TextEncoder:
    """Tokenizer + umT5 encoder, resident on one device. Call `encode_text(prompts)`."""

    def __init__(self, model: torch.nn.Module, tokenizer: PromptTokenizer, cfg: T5Config) -> None:
        self.model: Any = model  # a transformers UMT5EncoderModel
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> list[Tensor]:
        """prompts: B strings -> B tensors [L_i, D] in the model dtype, trimmed to the real token count.

        Tokens: cleaned text + EOS, truncated to text_len. Padding to the longest prompt with an
        attention mask gives the same values at the real positions as the reference's padding to 512.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"encode_text expects a non-empty list of strings, got {prompts!r}")
        batch = self.tokenizer([clean_prompt(p) for p in prompts])
        ids = batch.input_ids.to(self.device)  # [B, L]
        mask = batch.attention_mask.to(self.device)  # [B, L]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        lengths = mask.sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths, strict=True)]


def load_tokenizer(folder: Path, max_length: int = 512) -> PromptTokenizer:
    """`<folder>/tokenizer.json` as a `PromptTokenizer` truncating to `max_length` tokens."""
    from tokenizers import Tokenizer

    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"T5 tokenizer not found: {file}")
    return PromptTokenizer(Tokenizer.from_file(str(file)), max_length)


def load_t5(
    weights_dir: Path,
    cfg: T5Config = T5Config(),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> TextEncoder:
    """Load `<weights_dir>/Wan2.1-I2V-14B-480P/models_t5_umt5-xxl-enc-bf16.pth` and its tokenizer.

    The model is built on the meta device and the (renamed) tensors are assigned straight to
    `device` in `dtype` (bfloat16 as the reference by default).
    """
    from transformers import UMT5EncoderModel

    root = Path(weights_dir) / "Wan2.1-I2V-14B-480P"
    file = root / T5_FILE
    if not file.is_file():
        raise FileNotFoundError(f"T5 weights not found: {file}")
    tokenizer = load_tokenizer(root / T5_TOKENIZER_DIR, cfg.text_len)
    with torch.device("meta"):
        model = UMT5EncoderModel(_hf_config(cfg))
    state = map_state_dict(load_pth(file), expected_shapes(model), str(file))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared
    return TextEncoder(model.eval().requires_grad_(False), tokenizer, cfg)
