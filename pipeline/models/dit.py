"""The InfiniteTalk DiT: Wan2.1-I2V-14B with InfiniteTalk's audio projector and audio cross-attention.

Shape legend
    B   batch (independent samples; the reference always uses 1)
    C   latent channels (16); Cin = 36 = noisy latents 16 | mask 4 | reference latent 16
    F   latent frames (21 for an 81-frame chunk);  H, W latent height / width (pixels / 8)
    f, h, w = F/1, H/2, W/2 token grid;  S = h·w tokens per latent frame;  L = f·S tokens
    D   model width (5120);  N heads (40);  Dh head dim (128)
    Lt  text tokens (<= 512, zero-padded to 512 inside);  Li CLIP tokens (257)
    P   speakers (1 or 2);  A audio tokens per latent frame and speaker (32)
    Fa  audio frames per chunk (81 = 4(F-1)+1);  Wa audio window (5);  Ka wav2vec2 layers (12);
    Ca  wav2vec2 width (768);  Da audio token width (768)

Parameter names are the official Wan / InfiniteTalk ones (`blocks.0.self_attn.q.weight`,
`audio_proj.proj1.weight`, ...), so the released files load strictly with no conversion.

Each attention module holds its kernel (`pipeline.models.attention.Kernel`, given once by
`InfiniteTalkDiT.use_attention`); a block takes its tensors and one frozen `TokenGrid` (token
grid, RoPE tables, speakers, region masks, the sequence-parallel group) built once per forward.

Numerics follow the reference (MeiGen-AI/InfiniteTalk `wan/modules/multitalk_model.py`):
norms, modulation, time embedding and head in float32; everything else in the parameter dtype.
RoPE has two modes: "exact" (float64 complex product, the reference's numbers) and "fast"
(float32 cos/sin tables computed once per token grid and device; differs at the 1e-7 level).
With one speaker the reference-attention map is not computed (the reference computes and
discards it); with two it is computed with one fused attention call whose values are the
region masks (same quantity as the reference's softmax-then-mask sums).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import DiTConfig
from pipeline.models.attention import KERNELS, Kernel, pick, resolve, sdpa

if TYPE_CHECKING:
    from pipeline.offload import BlockSwap
    from pipeline.parallel import SequenceParallel

RopeMode = Literal["exact", "fast"]

#: modules whose parameters belong to the InfiniteTalk audio file, not the Wan shards
AUDIO_KEY_PARTS: tuple[str, ...] = ("audio_proj.", ".audio_cross_attn.", ".norm_x.")


def is_audio_key(key: str) -> bool:
    """True for a parameter stored in `InfiniteTalk/*/infinitetalk.safetensors`."""
    return key.startswith("audio_proj.") or any(part in key for part in AUDIO_KEY_PARTS[1:])


# ----------------------------------------------------------------------------------------------
# small layers


def f32_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)` computed in float32 (the reference's autocast(float32) islands)."""
    dequantize = getattr(layer, "dequantize", None)
    weight = dequantize(torch.float32) if dequantize is not None else cast(Tensor, layer.weight).float()
    bias = cast(Tensor | None, layer.bias)
    return F.linear(x.float(), weight, None if bias is None else bias.float())


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim: statistics in float32, result cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# ----------------------------------------------------------------------------------------------
# rotary position embeddings


class Rope3D:
    """3-D RoPE over (frame, row, column) with interleaved pairs, tables cached per grid/device."""

    def __init__(self, head_dim: int, max_len: int, theta: float, mode: RopeMode) -> None:
        if mode not in ("exact", "fast"):
            raise ValueError(f"rope mode must be 'exact' or 'fast', got {mode!r}")
        self.mode = mode
        pairs = head_dim // 2
        # pair counts per axis: time gets the remainder (22/21/21 for Dh=128, 6/5/5 for Dh=32)
        self.split = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)
        self.max_len = max_len
        self.theta = theta
        self._cache: dict[tuple[object, ...], tuple[Tensor, ...]] = {}

    def _angles(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """Rotation angles [L, pairs] in float64 (positions restart at 0 on every axis)."""
        if max(grid) > self.max_len:
            raise ValueError(f"token grid {grid} exceeds the RoPE table length {self.max_len}")
        per_axis = []
        for n_pos, n_pairs in zip(grid, self.split, strict=True):
            dim = 2 * n_pairs
            inv = 1.0 / torch.pow(
                torch.tensor(self.theta, dtype=torch.float64, device=device),
                torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim,
            )
            per_axis.append(torch.outer(torch.arange(n_pos, dtype=torch.float64, device=device), inv))
        f, h, w = grid
        angles = torch.cat(
            [
                per_axis[0].view(f, 1, 1, -1).expand(f, h, w, -1),
                per_axis[1].view(1, h, 1, -1).expand(f, h, w, -1),
                per_axis[2].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        )
        return angles.reshape(f * h * w, 1, -1)  # [L, 1, pairs]

    def tables(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, ...]:
        key = (grid, device, self.mode)
        if key not in self._cache:
            angles = self._angles(grid, device)
            if self.mode == "exact":
                self._cache[key] = (torch.polar(torch.ones_like(angles), angles),)  # complex128
            else:
                self._cache[key] = (angles.cos().float(), angles.sin().float())
        return self._cache[key]


def apply_rope(x: Tensor, tables: tuple[Tensor, ...]) -> Tensor:
    """x [B, L, N, Dh] rotated by `Rope3D.tables(...)` -> float32 [B, L, N, Dh].

    One table (complex128): the reference's float64 complex product. Two (cos, sin float32):
    the same rotation in float32 real arithmetic.
    """
    b, seq, n, d = x.shape
    if len(tables) == 1:
        xc = torch.view_as_complex(x.to(torch.float64).reshape(b, seq, n, d // 2, 2))
        return torch.view_as_real(xc * tables[0]).flatten(3).float()
    cos, sin = tables
    xr = x.float().reshape(b, seq, n, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3)


def rope_1d(x: Tensor, pos: Tensor, theta: float = 10000.0) -> Tensor:
    """Speaker RoPE: x [..., M, Dh], pos [..., M] -> rotated (adjacent pairs), in x's dtype."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device)[: d // 2].float() / d))
    angles = (pos.float()[..., None] * inv).repeat_interleave(2, dim=-1)  # [..., M, Dh]
    xf = x.float()
    pairs = xf.unflatten(-1, (d // 2, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * angles.cos() + rotated * angles.sin()).type_as(x)


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """Timestep embedding [B, dim] as the reference: float64, [cos | sin], freqs 10000^(-i/half)."""
    half = dim // 2
    pos = t.to(torch.float64)
    sinusoid = torch.outer(pos, torch.pow(10000, -torch.arange(half, device=t.device).to(pos).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


@dataclass(frozen=True, slots=True)
class TokenGrid:
    """What every block of one forward shares besides its tensors (built once in `_embed`)."""

    grid: tuple[int, int, int]  # this rank's token grid (the whole grid without sequence parallelism)
    full_grid: tuple[int, int, int]  # the whole token grid
    rope: tuple[Tensor, ...]  # `Rope3D.tables` of this rank's tokens
    speakers: int  # P
    region_masks: Tensor | None  # [3, S] (two speakers only)
    sp: SequenceParallel | None  # the process group splitting the tokens, or None


# ----------------------------------------------------------------------------------------------
# attention layers


class WanSelfAttention(nn.Module):
    """Self-attention over the tokens with 3-D RoPE, and the speaker map when two speakers talk.

    `kernel` runs the one-GPU self-attention (`exact_kernel`, or `attention_fp8` when fp8
    attention is on); `exact_kernel` runs the speaker map and, under sequence parallelism, the
    whole-sequence attention. Both are set by `InfiniteTalkDiT.use_attention`.
    """

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.kernel: Kernel = sdpa
        self.exact_kernel: Kernel = sdpa
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)
        self.norm_k = WanRMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, g: TokenGrid) -> tuple[Tensor, Tensor | None]:
        """x [B, L, D] -> ([B, L, D], speaker map [B, 3, L] when `g.region_masks` [3, S] is given).

        With `g.sp` (sequence parallel), x holds this rank's tokens.
        """
        b, seq, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = apply_rope(self.norm_q(self.q(x)).view(b, seq, n, d), g.rope)  # [B, L, N, Dh] fp32
        k = apply_rope(self.norm_k(self.k(x)).view(b, seq, n, d), g.rope)
        v = self.v(x).view(b, seq, n, d)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if g.sp is None:
            out = self.o(self.kernel(q, k, v).flatten(2))  # [B, L, D]
        else:
            out = self.o(g.sp.attention(q, k, v, g.full_grid, self.exact_kernel).flatten(2))
        speaker_map = None
        if g.region_masks is not None:
            if g.sp is not None:
                k = g.sp.first_frame_keys(k, g.region_masks.shape[1])
            speaker_map = region_attention_map(
                q.to(out.dtype), k.to(out.dtype), g.region_masks, self.exact_kernel
            )
        return out, speaker_map


def region_attention_map(q: Tensor, k: Tensor, region_masks: Tensor, kernel: Kernel = sdpa) -> Tensor:
    """How much each token attends to each first-frame region, averaged over heads.

    q, k [B, L, N, Dh] (post-RoPE); region_masks [C, S] over the first latent frame's tokens.
    Returns [B, C, L]: mean over heads of Σ_s softmax(q kᵀ/√Dh)[., s]·mask_c[s] / Σ mask_c.
    Computed as attention whose values are the masks (zero-padded to Dh columns).
    """
    b, seq, n, d = q.shape
    c, s = region_masks.shape
    if c > d:
        raise ValueError(f"{c} region masks exceed the head dim {d}")
    k_ref = k[:, :s]  # [B, S, N, Dh] first latent frame
    values = torch.zeros(b, s, n, d, dtype=q.dtype, device=q.device)
    values[..., :c] = region_masks.to(q.dtype).t()[None, :, None, :]
    mass = kernel(q, k_ref, values)[..., :c]  # [B, L, N, C]
    mass = mass / region_masks.to(q.dtype).sum(dim=1)
    return mass.mean(dim=2).transpose(1, 2)  # [B, C, L]


class WanI2VCrossAttention(nn.Module):
    """Cross-attention to the context: image tokens and text tokens, two softmaxes, summed."""

    def __init__(self, dim: int, num_heads: int, eps: float, clip_tokens: int) -> None:
        super().__init__()
        self.kernel: Kernel = sdpa  # set by `InfiniteTalkDiT.use_attention`
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.clip_tokens = clip_tokens
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)
        self.norm_k = WanRMSNorm(dim, eps=eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, L, D], context [B, Li + Lt, D] (image tokens first) -> [B, L, D]."""
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        ctx_img, ctx_txt = context[:, : self.clip_tokens], context[:, self.clip_tokens :]
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(ctx_txt)).view(b, -1, n, d)
        v = self.v(ctx_txt).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(ctx_img)).view(b, -1, n, d)
        v_img = self.v_img(ctx_img).view(b, -1, n, d)
        out_img = self.kernel(q, k_img, v_img).flatten(2)
        out_txt = self.kernel(q, k, v).flatten(2)
        return self.o(out_txt + out_img)


class AudioCrossAttention(nn.Module):
    """Per-latent-frame attention from video tokens to that frame's audio tokens.

    Reference name: `SingleStreamMutiAttention` (q/k norms are identities, so they have no keys).
    With two speakers, queries and audio keys get a 1-D RoPE position that binds each video token
    to the speaker whose first-frame region it attends to most.
    """

    def __init__(
        self, dim: int, audio_dim: int, num_heads: int, class_range: int, class_interval: int
    ) -> None:
        super().__init__()
        self.kernel: Kernel = sdpa  # set by `InfiniteTalkDiT.use_attention`
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.speaker1 = (0.0, float(class_interval))
        self.speaker2 = (float(class_range - class_interval), float(class_range))
        self.background = float(class_range // 2)

    def forward(self, x: Tensor, audio: Tensor, g: TokenGrid, speaker_map: Tensor | None) -> Tensor:
        """x [B, L, D], audio [B, F, P·A, Da], speaker_map [B, 3, L] (P == 2) -> [B, L, D]."""
        b, seq, dim = x.shape
        f = g.grid[0]
        s = seq // f
        n, d = self.num_heads, self.head_dim
        q = self.q_linear(x).view(b, f, s, n, d)  # [B, F, S, N, Dh]
        na = audio.shape[2]
        kv = self.kv_linear(audio).view(b, f, na, 2, n, d)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]  # [B, F, P·A, N, Dh]: first D outputs are keys
        if g.speakers == 2:
            if speaker_map is None:
                raise ValueError("two speakers need the region masks (ref_target_masks)")
            pos = self._speaker_positions(speaker_map, g.sp)  # [B, L]
            q = rope_1d(q.permute(0, 3, 1, 2, 4).reshape(b, n, seq, d), pos[:, None])
            q = q.view(b, n, f, s, d).permute(0, 2, 3, 1, 4)  # [B, F, S, N, Dh]
            audio_pos = torch.full((na,), self.speaker2[0] / 2 + self.speaker2[1] / 2, device=x.device)
            audio_pos[: na // 2] = (self.speaker1[0] + self.speaker1[1]) / 2
            audio_pos = audio_pos.to(k.dtype)
            k = rope_1d(k.transpose(2, 3), audio_pos).transpose(2, 3)
        out = self.kernel(q.reshape(b * f, s, n, d), k.reshape(b * f, na, n, d), v.reshape(b * f, na, n, d))
        return self.proj(out.reshape(b, seq, dim))

    def _speaker_positions(self, speaker_map: Tensor, sp: SequenceParallel | None = None) -> Tensor:
        """[B, 3, L] attention mass per region -> [B, L] RoPE position per video token."""
        hi = speaker_map.amax(dim=2, keepdim=True)  # [B, 3, 1]
        lo = speaker_map.amin(dim=2, keepdim=True)
        if sp is not None:  # this rank holds part of the tokens: the range is the group's
            hi, lo = sp.bounds(hi, lo)
        scaled = []
        for idx, (start, end) in enumerate((self.speaker1, self.speaker2)):
            norm = (speaker_map[:, idx] - lo[:, idx]) / (hi[:, idx] - lo[:, idx] + 1e-8)
            scaled.append(norm * (end - start) + start)
        scaled.append(torch.full_like(scaled[0], self.background))
        choices = torch.stack(scaled, dim=1)  # [B, 3, L]
        winner = speaker_map.argmax(dim=1, keepdim=True)  # [B, 1, L]
        return choices.gather(1, winner).squeeze(1)


# ----------------------------------------------------------------------------------------------
# block, head, projectors


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, eps, cfg.clip_tokens)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.audio_cross_attn = AudioCrossAttention(
            dim, cfg.output_dim, cfg.num_heads, cfg.class_range, cfg.class_interval
        )
        self.norm_x = WanLayerNorm(dim, eps, elementwise_affine=True)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, audio: Tensor, g: TokenGrid) -> Tensor:
        """x [B, L, D] (param dtype), e0 [B, 6, D] fp32, context [B, Li + Lt, D], audio
        [B, F, P·A, Da] -> [B, L, D]. With `g.sp`, x, audio and `g.rope` are this rank's share."""
        dtype = x.dtype
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.float() + e0).chunk(
            6, dim=1
        )  # each [B, 1, D] fp32
        h = (self.norm1(x).float() * (1 + scale_msa) + shift_msa).to(dtype)
        y, speaker_map = self.self_attn(h, g)
        x = (x + y * gate_msa).to(dtype)
        x = x + self.cross_attn(self.norm3(x), context)
        x = x + self.audio_cross_attn(self.norm_x(x), audio, g, speaker_map)
        y = self.ffn((self.norm2(x).float() * (1 + scale_ffn) + shift_ffn).to(dtype))
        return (x + y * gate_ffn).to(dtype)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, D], e [B, D] fp32 (time_embedding output) -> [B, L, p·C] fp32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return f32_linear(self.head, self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP image tokens -> model width: LN, Linear, GELU, Linear, LN (key names `img_emb.proj.*`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, clip_fea: Tensor) -> Tensor:
        return self.proj(clip_fea)


class AudioProjModel(nn.Module):
    """wav2vec2 windows -> A audio tokens per latent frame (key names `audio_proj.*`)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        per_frame = cfg.audio_blocks * cfg.audio_channels
        self.context_tokens = cfg.context_tokens
        self.output_dim = cfg.output_dim
        self.proj1 = nn.Linear(cfg.audio_window * per_frame, cfg.intermediate_dim)
        self.proj1_vf = nn.Linear(cfg.audio_window_vf * per_frame, cfg.intermediate_dim)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = nn.LayerNorm(cfg.output_dim)

    def forward(self, first: Tensor, rest: Tensor) -> Tensor:
        """first [X, 1, Wa, Ka, Ca], rest [X, F-1, Wa+3, Ka, Ca] -> [X, F, A, Da] fp32 (X = B·P)."""
        x = first.shape[0]
        z0 = torch.relu(self.proj1(first.flatten(2)))  # [X, 1, I]  flatten order [window][layer][channel]
        z = torch.relu(self.proj1_vf(rest.flatten(2)))  # [X, F-1, I]
        z = torch.relu(self.proj2(torch.cat([z0, z], dim=1)))  # [X, F, I]
        tokens = self.proj3(z).view(x, -1, self.context_tokens, self.output_dim)  # [X, F, A, Da]
        weight = self.norm.weight.float()
        bias = self.norm.bias.float()
        return F.layer_norm(tokens.float(), (self.output_dim,), weight, bias, self.norm.eps)


def regroup_audio_windows(audio: Tensor, audio_window: int, vae_scale: int) -> tuple[Tensor, Tensor]:
    """Per-video-frame windows -> per-latent-frame windows.

    audio [X, Fa, Wa, Ka, Ca] -> first [X, 1, Wa, Ka, Ca] (video frame 0's window) and
    rest [X, (Fa-1)/4, Wa+3, Ka, Ca]: for each group of 4 video frames, the first frame's
    window up to its centre, the centres of the middle frames, the last frame's window from its
    centre (8 contiguous audio frames for Wa = 5).
    """
    x, fa = audio.shape[:2]
    mid = audio_window // 2
    groups = audio[:, 1:].reshape(x, (fa - 1) // vae_scale, vae_scale, *audio.shape[2:])
    head = groups[:, :, 0, : mid + 1]  # [X, n, mid+1, Ka, Ca]
    middle = groups[:, :, 1:-1, mid]  # [X, n, vs-2, Ka, Ca]
    tail = groups[:, :, -1, mid:]  # [X, n, Wa-mid, Ka, Ca]
    return audio[:, :1], torch.cat([head, middle, tail], dim=2)


# ----------------------------------------------------------------------------------------------
# the model


@dataclass(slots=True, kw_only=True)
class _PassState:
    """One pass of a forward between the embeddings and the head (`forward_passes`)."""

    tokens: Tensor  # [B, L, D] (this rank's L_r with sequence parallelism)
    e: Tensor  # [B, D] fp32
    e0: Tensor  # [B, 6, D] fp32
    context: Tensor  # [B, Li + text_len, D]
    audio: Tensor  # [B, F, P·A, Da] (this rank's F_r frames with sequence parallelism)
    g: TokenGrid
    shape: tuple[int, int, int, int]  # (B, F, H, W) of the latents


class InfiniteTalkDiT(nn.Module):
    """Wan2.1 I2V DiT + InfiniteTalk audio adapter. Build on the meta device, then load weights.

    `rope_mode` ("exact" | "fast") is a plain attribute and `use_attention` gives the attention
    modules their kernels; both can be changed after loading (`pipeline.perf.apply_dit_perf`).
    """

    #: modules computed in float32 whatever the parameter dtype (the reference's autocast(float32)
    #: islands; `f32_linear`, `WanLayerNorm`, the modulations): the time embedding and projection,
    #: every norm, the modulation tables and the head's linear layer
    FP32_MODULES: ClassVar[tuple[str, ...]] = (
        "time_embedding",
        "time_projection",
        "head",
        "audio_proj.norm",
        "blocks.*.norm1",
        "blocks.*.norm2",
        "blocks.*.norm3",
        "blocks.*.norm_x",
        "blocks.*.modulation",
    )
    #: the repeated block: compiled once per shape for all (`pipeline.compile`), streamed from
    #: host memory one at a time (`pipeline.offload`), quantised to fp8 (`pipeline.fp8`)
    REPEATED_BLOCK: ClassVar[str] = "blocks"

    def __init__(self, cfg: DiTConfig, *, rope: RopeMode = "exact") -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.img_emb = MLPProj(cfg.clip_dim, dim)
        self.audio_proj = AudioProjModel(cfg)
        self.rope_mode: RopeMode = rope
        self._attention = "sdpa"  # the concrete kernel name the attention modules hold
        self._rope: Rope3D | None = None
        #: `pipeline.parallel.SequenceParallel` to split each forward over a process group, or None
        self.sequence_parallel: SequenceParallel | None = None
        #: `pipeline.offload.BlockSwap` streaming some blocks from host memory, or None (all resident)
        self.block_swap: BlockSwap | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the dtype the non-quantized parameters are stored in)."""
        return self.patch_embedding.weight.dtype

    @property
    def attention_backend(self) -> str:
        """The concrete attention kernel the modules hold (sdpa, cudnn, flash or fa4)."""
        return self._attention

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        self.use_attention(name)

    def use_attention(self, name: str, *, fp8: bool = False) -> str:
        """Give every attention module its kernel for `name` (one of `pipeline.choices.ATTENTION`
        or a concrete name), resolved once for this model's device and dtype; with `fp8`, the
        one-GPU self-attention runs `attention_fp8`. Returns the concrete name."""
        device, dtype = self.patch_embedding.weight.device, self.dtype
        exact = pick(name, device, dtype, long_keys=True)
        short = pick(name, device, dtype, long_keys=False)
        for block in cast(Iterable[WanAttentionBlock], self.blocks):
            block.self_attn.kernel = KERNELS["fp8"] if fp8 else exact
            block.self_attn.exact_kernel = exact
            block.cross_attn.kernel = short
            block.audio_cross_attn.kernel = short
        self._attention = resolve(name, device, dtype)
        return self._attention

    def compile_blocks(self, *, mode: str | None = None) -> None:
        """Regional compilation: compile each block once (shapes are static per size bucket).

        Call after loading, on CUDA. The first forward per token grid and speaker count pays the
        compile time (about 10 s per distinct block signature on an H100).
        """
        for block in self.blocks:
            block.compile(dynamic=False, mode=mode)

    def rope(self) -> Rope3D:
        if self._rope is None or self._rope.mode != self.rope_mode:
            self._rope = Rope3D(self.cfg.head_dim, self.cfg.rope_max_len, self.cfg.rope_theta, self.rope_mode)
        return self._rope

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        clip_fea: Tensor,
        y: Tensor,
        audio: Tensor,
        ref_target_masks: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow velocity for one denoising step.

        Args:
            x: noisy latents [B, 16, F, H, W].
            t: timesteps [B] (or a scalar), continuous values in [0, 1000].
            context: T5 output [B, Lt, text_dim], Lt <= text_len, trimmed to the real tokens and
                zero-padded by the caller to a common Lt (it is zero-padded to text_len here, as
                the reference does).
            clip_fea: CLIP features of the reference frame [B, clip_tokens, clip_dim].
            y: conditioning [B, 20, F, H, W] = 4 mask channels | 16 reference-latent channels.
            audio: wav2vec2 windows [B, P, Fa, Wa, Ka, Ca] with Fa = 4(F-1)+1, P = 1 or 2 speakers
                (null audio for CFG = zeros with P = 1).
            ref_target_masks: speaker regions [3, H, W] or [B, 3, H, W] at latent resolution
                (person 1, person 2, background); required when P == 2, ignored when P == 1.

        Returns:
            velocity [B, 16, F, H, W], float32.
        """
        return self.forward_passes([(x, t, context, clip_fea, y, audio, ref_target_masks)])[0]

    def forward_passes(self, passes: Sequence[tuple[Tensor | None, ...]]) -> list[Tensor]:
        """Several forwards (the guidance passes of one step), each a tuple of `forward`'s
        arguments, run block by block: every block computes all passes before the next block
        starts, so a block streamed from host memory (`block_swap`) is copied once per step, not
        once per pass. Each pass gets exactly the numbers of its own `forward` call."""
        states = [self._embed(*p) for p in passes]  # type: ignore[arg-type]
        blocks: Iterable[nn.Module] = self.blocks if self.block_swap is None else self.block_swap.order()
        for block in blocks:  # the one block loop (with sequence parallelism: this rank's tokens)
            for st in states:
                st.tokens = block(st.tokens, st.e0, st.context, st.audio, st.g)
        return [self._unpatchify(st) for st in states]

    def _embed(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        clip_fea: Tensor,
        y: Tensor,
        audio: Tensor,
        ref_target_masks: Tensor | None = None,
    ) -> _PassState:
        """Steps 1-6 of a forward: tokens, time, context, audio tokens, speaker regions, RoPE."""
        cfg = self.cfg
        b, _, n_f, n_h, n_w = x.shape
        pt, ph, pw = cfg.patch_size
        if y.shape[0] != b or y.shape[2:] != x.shape[2:] or x.shape[1] + y.shape[1] != cfg.in_dim:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must stack to {cfg.in_dim} channels")
        if n_f % pt or n_h % ph or n_w % pw:
            raise ValueError(f"latent size {(n_f, n_h, n_w)} is not divisible by the patch {cfg.patch_size}")
        grid = (n_f // pt, n_h // ph, n_w // pw)
        dtype, device = self.dtype, x.device

        # 1. patchify: [B, 36, F, H, W] -> [B, L, D]
        tokens = self.patch_embedding(torch.cat([x, y], dim=1).to(dtype)).flatten(2).transpose(1, 2)

        # 2. time: e [B, D] and e0 [B, 6, D], float32
        e, e0 = self._time(t, b)

        # 3. context: [B, Li + text_len, D], image tokens first
        context = self._context(context, clip_fea, b)

        # 4. audio tokens: [B, F, P·A, Da]
        audio_tokens, speakers = self._audio_tokens(audio, b, grid[0])
        audio_tokens = audio_tokens.to(dtype)

        # 5. speaker regions over the first frame's tokens: [3, S] (two speakers only)
        region_masks = None
        if speakers == 2:
            region_masks = self._region_masks(ref_target_masks, grid, device, dtype)

        # 6. (the blocks run in forward_passes) RoPE tables; with sequence parallelism this
        # rank's share of the tokens, sharded once here
        rope = self.rope().tables(grid, device)
        sp = self.sequence_parallel
        local_grid = grid
        if sp is not None:
            tokens, rope, local_grid = sp.shard(tokens, rope, grid)
            audio_tokens = audio_tokens[:, sp.local_frames(grid)]  # [B, F_r, P·A, Da]
        g = TokenGrid(local_grid, grid, rope, speakers, region_masks, sp)
        return _PassState(
            tokens=tokens, e=e, e0=e0, context=context, audio=audio_tokens, g=g, shape=(b, n_f, n_h, n_w)
        )

    def _time(self, t: Tensor, b: int) -> tuple[Tensor, Tensor]:
        """Timesteps [B] or a scalar -> e [B, D] and e0 [B, 6, D], float32."""
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
        sin = sinusoidal_embedding(self.cfg.freq_dim, t).float()
        e = f32_linear(self.time_embedding[2], F.silu(f32_linear(self.time_embedding[0], sin)))
        e0 = f32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def _context(self, context: Tensor, clip_fea: Tensor, b: int) -> Tensor:
        """T5 output [B, Lt, text_dim] and CLIP features -> [B, Li + text_len, D], image tokens first."""
        cfg, dtype = self.cfg, self.dtype
        if context.ndim != 3 or context.shape[1] > cfg.text_len or context.shape[0] != b:
            raise ValueError(
                f"context must be [B={b}, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}"
            )
        context = F.pad(context.to(dtype), (0, 0, 0, cfg.text_len - context.shape[1]))
        return torch.cat([self.img_emb(clip_fea.to(dtype)), self.text_embedding(context)], dim=1).to(dtype)

    def _unpatchify(self, st: _PassState) -> Tensor:
        """Step 7: head and unpatchify: [B, L, p·C] -> velocity [B, C, F, H, W] float32."""
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        b, n_f, n_h, n_w = st.shape
        out = self.head(st.tokens, st.e)
        if st.g.sp is not None:
            out = st.g.sp.gather(out, st.g.full_grid)
        f, h, w = st.g.full_grid
        out = out.view(b, f, h, w, pt, ph, pw, cfg.out_dim)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(b, cfg.out_dim, n_f, n_h, n_w).float()

    def _audio_tokens(self, audio: Tensor, b: int, n_frames: int) -> tuple[Tensor, int]:
        cfg = self.cfg
        expected = (cfg.audio_window, cfg.audio_blocks, cfg.audio_channels)
        if audio.ndim != 6 or audio.shape[0] != b or tuple(audio.shape[3:]) != expected:
            raise ValueError(
                f"audio must be [B={b}, P, Fa, {', '.join(map(str, expected))}], got {tuple(audio.shape)}"
            )
        speakers, fa = audio.shape[1], audio.shape[2]
        if speakers not in (1, 2):
            raise ValueError(f"1 or 2 speakers are supported, audio has {speakers}")
        if fa != (n_frames - 1) * cfg.vae_scale + 1:
            raise ValueError(
                f"audio has {fa} frames; {n_frames} latent frames need {(n_frames - 1) * cfg.vae_scale + 1}"
            )
        flat = audio.reshape(b * speakers, *audio.shape[2:]).to(self.dtype)
        first, rest = regroup_audio_windows(flat, cfg.audio_window, cfg.vae_scale)
        tokens = self.audio_proj(first, rest)  # [B·P, F, A, Da]
        tokens = tokens.view(b, speakers, n_frames, cfg.context_tokens, cfg.output_dim)
        return tokens.transpose(1, 2).reshape(
            b, n_frames, speakers * cfg.context_tokens, cfg.output_dim
        ), speakers

    def _region_masks(
        self, masks: Tensor | None, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        if masks is None:
            raise ValueError("two speakers need ref_target_masks [3, H, W] (person 1, person 2, background)")
        if masks.ndim == 4:
            if masks.shape[0] != 1 and not bool((masks == masks[:1]).all()):
                raise ValueError("ref_target_masks must be the same for every batch entry")
            masks = masks[0]
        if masks.ndim != 3 or masks.shape[0] != 3:
            raise ValueError(f"ref_target_masks must be [3, H, W], got {tuple(masks.shape)}")
        _, n_h, n_w = grid
        small = F.interpolate(
            masks[None].to(device=device, dtype=torch.float32), size=(n_h, n_w), mode="nearest"
        )[0]
        return (small > 0).view(3, -1).to(dtype)  # [3, S]


def build_dit(
    cfg: DiTConfig, *, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32
) -> InfiniteTalkDiT:
    """An uninitialised DiT (meta device by default: no memory until weights are assigned)."""
    with torch.device(device):
        model = InfiniteTalkDiT(cfg)
    return model.to(dtype=dtype) if str(device) != "meta" else model


def dit_param_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the model and its shape, in module order."""
    return {k: tuple(v.shape) for k, v in build_dit(cfg).state_dict().items()}
