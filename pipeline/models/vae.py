"""Wan 2.1 causal 3-D VAE (`Wan2.1_VAE.pth`): encode video to normalised latents and back.

Shape legend
    C  pixel channels (3) · Z latent channels (16) · F pixel frames (4n+1) · f latent frames (n+1)
    H, W pixel height/width (multiples of 8) · h, w latent height/width (H/8, W/8)
    encode: video [3, F, H, W] in [-1, 1]  ->  latents [Z, f, h, w], normalised per channel
    decode: latents [Z, f, h, w]           ->  video [3, F, H, W] clamped to [-1, 1]

Time is causal everywhere: every 3x3x3 convolution pads two frames *before* the clip and none
after. Encoding runs in frame groups 1, 4, 4, ... and decoding one latent frame at a time; the
frames a convolution needs from the previous group come from a `FeatureCache` (one entry per
temporal convolution, at most `CACHE_T` frames each), so the result equals a single pass over the
whole clip while the activations stay small.

Spatial tiling (`VaeTiling`, for GPUs where one chunk's activations do not fit): overlapping
tiles, each through the whole causal frame loop with its own cache, blended linearly in the
overlaps; `vae_peak_bytes` estimates a call's peak memory and `fit_tiling` picks the fewest tiles
that fit a budget (formula and calibration above `vae_peak_bytes`; docs/rendering.md).

Module attribute names follow the released checkpoint exactly (`encoder.downsamples.3.residual.2`,
`decoder.upsamples.7.time_conv`, `conv1`, `conv2`, ...), so the file loads with `strict=True` and
no key conversion. transformers has no Wan VAE, hence our own implementation (docs/parity-encoders.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_T = 2  # frames of context a causal 3x3x3 convolution needs from the previous group

# Per-channel latent statistics of the released VAE (latent = (mu - mean) / std).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

VAE_FILE = "Wan2.1_VAE.pth"


@dataclass(frozen=True, slots=True, kw_only=True)
class VAEConfig:
    """Hyper-parameters of the Wan VAE; the defaults are the released model's."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = field(default=LATENT_MEAN)
    latent_std: tuple[float, ...] = field(default=LATENT_STD)

    def __post_init__(self) -> None:
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(
                f"latent_mean/latent_std need z_dim={self.z_dim} values, "
                f"got {len(self.latent_mean)} and {len(self.latent_std)}"
            )
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} flags for dim_mult={self.dim_mult}, "
                f"got {self.temporal_downsample}"
            )

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class VaeTiling:
    """Spatial tiling of encode/decode: a `rows` x `cols` grid of tiles that share `overlap`
    latent pixels (x8 video pixels) with each neighbour, blended linearly there.

    Time is never tiled: each tile runs through the whole causal frame loop with its own
    feature cache. 1x1 is the single pass (bit-identical to no tiling). The attention of the
    middle block and the convolutions' receptive field see one tile only, so a tiled result is an
    approximation (tests/pipeline/models/test_vae_tiling.py states the bound); a larger overlap is closer.
    """

    rows: int = 1
    cols: int = 1
    overlap: int = 8  # latent pixels shared by neighbouring tiles (diffusers' Wan tiling: 8)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or self.overlap < 0:
            raise ValueError(
                f"VaeTiling needs rows >= 1, cols >= 1 and overlap >= 0, "
                f"got rows={self.rows}, cols={self.cols}, overlap={self.overlap}"
            )

    @property
    def is_tiled(self) -> bool:
        return self.rows * self.cols > 1

    def tile_size(self, h: int, w: int) -> tuple[int, int]:
        """The latent height and width of the largest tile for a latent grid h x w."""
        return _span_length(h, self.rows, self.overlap), _span_length(w, self.cols, self.overlap)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}" + (f" (overlap {self.overlap})" if self.is_tiled else "")


def _span_length(size: int, n: int, overlap: int) -> int:
    if n > size:
        raise ValueError(f"cannot cut {size} latent pixels into {n} tiles (at most one tile per pixel)")
    return min(size, -(-(size + (n - 1) * overlap) // n))  # ceil((size + (n-1)·overlap) / n)


def tile_spans(size: int, n: int, overlap: int) -> list[tuple[int, int]]:
    """`n` spans [start, end) of equal length covering 0..size, neighbours sharing >= overlap."""
    length = _span_length(size, n, overlap)
    if n == 1:
        return [(0, size)]
    starts = [round(i * (size - length) / (n - 1)) for i in range(n)]
    return [(s, s + length) for s in starts]


def _ramp(spans: list[tuple[int, int]], i: int, scale: int) -> Tensor:
    """Blend weights of span i in output units (x scale): rising over the overlap with the
    previous span, falling over the overlap with the next, 1 elsewhere; the weights of two
    neighbours sum to 1 in their overlap."""
    start, end = spans[i]
    x = torch.arange((end - start) * scale, dtype=torch.float32) + 0.5
    w = torch.ones_like(x)
    if i > 0 and (left := (spans[i - 1][1] - start) * scale) > 0:
        w = torch.minimum(w, x / left)
    if i + 1 < len(spans) and (right := (end - spans[i + 1][0]) * scale) > 0:
        w = torch.minimum(w, (x.numel() - x) / right)
    return w


def _tiles(
    h: int, w: int, tiling: VaeTiling, *, scale: int, device: torch.device
) -> Iterator[tuple[tuple[int, int], tuple[int, int], Tensor]]:
    """Row span, column span (latent units) and the 2-D blend weights [th*scale, tw*scale] of each tile."""
    rows, cols = tile_spans(h, tiling.rows, tiling.overlap), tile_spans(w, tiling.cols, tiling.overlap)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ramp = _ramp(rows, i, scale)[:, None] * _ramp(cols, j, scale)[None, :]
            yield r, c, ramp.to(device)


class FeatureCache:
    """The frames each temporal convolution keeps from the previous group (encode or decode).

    One entry per module, keyed by the module itself; `REPEAT` marks an upsampling layer that has
    seen the first latent frame (that frame is not doubled in time).
    """

    REPEAT = "repeat"

    def __init__(self) -> None:
        self._entries: dict[int, Tensor | str] = {}

    def get(self, module: nn.Module) -> Tensor | str | None:
        return self._entries.get(id(module))

    def put(self, module: nn.Module, value: Tensor | str) -> None:
        self._entries[id(module)] = value

    def __len__(self) -> int:
        return len(self._entries)


def _tail(x: Tensor, previous: Tensor | None) -> Tensor:
    """The last CACHE_T frames of `x` (topped up with the previous cache's last frame)."""
    tail = x[:, :, -CACHE_T:].clone()
    if tail.shape[2] < CACHE_T and previous is not None:
        tail = torch.cat([previous[:, :, -1:].to(tail), tail], dim=2)
    return tail


class CausalConv3d(nn.Conv3d):
    """Conv3d with symmetric spatial padding and all temporal padding in front (causal)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        pt, ph, pw = cast(tuple[int, int, int], self.padding)
        self.time_pad: int = 2 * pt
        self.padding = (0, ph, pw)  # spatial zero padding stays inside the convolution (no copy)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: [B, C, T, H, W]; `context`: frames that precede x in time (replace zero padding)."""
        time_pad = self.time_pad
        if context is not None and time_pad > 0:
            x = torch.cat([context.to(x), x], dim=2)
            time_pad -= context.shape[2]
        if time_pad > 0:
            x = F.pad(x, (0, 0, 0, 0, time_pad, 0))
        return super().forward(x)

    def cached(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        """Forward with this layer's cache entry as context, then store x's tail for the next group."""
        if cache is None:
            return self(x)
        previous = cache.get(self)
        assert not isinstance(previous, str)
        cache.put(self, _tail(x, previous))
        return self(x, previous)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned per-channel gain (`gamma`)."""

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample(nn.Module):
    """Nearest-exact 2x spatial upsampling computed in float32 (bf16 lacks the kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial 2x down/up sampling, optionally with a causal temporal 2x (`time_conv`)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', H*2 or H/2, W*2 or W/2]."""
        if self.mode == "upsample3d" and cache is not None:
            x = self._upsample_time(x, cache)
        b, t = x.shape[0], x.shape[2]
        y = self.resample(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
        x = y.unflatten(0, (b, t)).transpose(1, 2)  # [B, C', T, H', W']
        if self.mode == "downsample3d" and cache is not None:
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        previous = cache.get(self.time_conv)
        if previous is None:  # the first latent frame is not doubled
            cache.put(self.time_conv, FeatureCache.REPEAT)
            return x
        if isinstance(previous, str):  # second group: the context before the clip is zeros
            previous = torch.zeros_like(x[:, :, :1]).expand(-1, -1, CACHE_T, -1, -1)
        cache.put(self.time_conv, _tail(x, previous))
        y = self.time_conv(x, previous)  # [B, 2C, T, H, W]
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c2 // 2, t * 2, h, w)  # [B, C, 2T, H, W]

    def _downsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        previous = cache.get(self.time_conv)
        cache.put(self.time_conv, x[:, :, -1:].clone())
        if previous is None:  # the first frame passes through unchanged
            return x
        assert not isinstance(previous, str)
        return self.time_conv(torch.cat([previous[:, :, -1:], x], dim=2))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; keeps the checkpoint's indices
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer.cached(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W]
        qkv = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1)  # [B*T, 1, H*W, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        y = self.proj(y).unflatten(0, (b, t)).transpose(1, 2)  # [B, C, T, H, W]
        return x + y


class Head(nn.Sequential):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        for layer in self:
            x = layer.cached(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(
                    Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = Head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        """x: [B, 3, T, H, W] -> [B, 2Z, t, H/8, W/8] (mean and log-variance)."""
        x = self.conv1.cached(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head(x, cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mults = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mults[-1], *mults[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim //= 2  # the previous upsampling halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mults) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = Head(dims[-1], 3)

    def forward(self, x: Tensor, cache: FeatureCache | None) -> Tensor:
        """x: [B, Z, t, h, w] -> [B, 3, T, 8h, 8w]."""
        x = self.conv1.cached(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head(x, cache)


class WanVAE(nn.Module):
    """The Wan VAE with latent normalisation. Parameter names match `Wan2.1_VAE.pth`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.channels_last = False
        self.tiling: VaeTiling | None = None  # encode/decode default (the memory plan sets it)
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(self.cfg.latent_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.cfg.latent_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def use_channels_last(self) -> WanVAE:
        """Store conv weights and activations channels-last (faster cuDNN conv3d in bf16 on GPUs)."""
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if param.ndim in (4, 5):
                    fmt = torch.channels_last_3d if param.ndim == 5 else torch.channels_last
                    param.data = param.data.contiguous(memory_format=fmt)
        self.channels_last = True
        return self

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(device=self.conv1.weight.device, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    @torch.no_grad()
    def encode(self, video: Tensor, tiling: VaeTiling | None = None) -> Tensor:
        """video: [3, F, H, W] in [-1, 1], F = 4n+1, H and W multiples of 8 -> latents [Z, n+1, H/8, W/8].

        Returns the normalised mean (no sampling), in float32. `tiling` (default `self.tiling`)
        encodes overlapping spatial tiles one after the other, each through the whole causal time
        loop, and blends their latents linearly in the overlaps; None or 1x1 is the single pass.
        """
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"VAE.encode expects a video [3, F, H, W], got shape {tuple(video.shape)}")
        _, frames, height, width = video.shape
        stride_t, stride_s = self.cfg.temporal_stride, self.cfg.spatial_stride
        if (frames - 1) % stride_t or height % stride_s or width % stride_s:
            raise ValueError(
                f"VAE.encode needs F = {stride_t}n+1 frames and H, W multiples of {stride_s}; "
                f"got F={frames}, H={height}, W={width}"
            )
        x = self._prepare(video.unsqueeze(0))  # [1, 3, F, H, W]
        tiling = tiling if tiling is not None else self.tiling
        mu = self._encode_tiled(x, tiling) if tiling is not None and tiling.is_tiled else self._encode_mu(x)
        mean, std = self._stats(mu)
        return ((mu - mean) / std)[0].contiguous()

    def _encode_mu(self, x: Tensor) -> Tensor:
        """x: [1, 3, F, H, W] prepared -> the posterior mean [1, Z, f, H/8, W/8] in float32."""
        cache = FeatureCache()
        groups = [x[:, :, :1]] + list(x[:, :, 1:].split(self.cfg.temporal_stride, dim=2))
        groups = [g for g in groups if g.shape[2]]  # F = 1: no later group
        out = torch.cat([self.encoder(g, cache) for g in groups], dim=2)  # [1, 2Z, f, h, w]
        return self.conv1(out).chunk(2, dim=1)[0].float()

    def _encode_tiled(self, x: Tensor, tiling: VaeTiling) -> Tensor:
        """x: [1, 3, F, H, W] -> [1, Z, f, h, w] float32, tile by tile, blended in latent space."""
        _, _, frames, height, width = x.shape
        s = self.cfg.spatial_stride
        h, w, f = height // s, width // s, (frames - 1) // self.cfg.temporal_stride + 1
        mu = torch.zeros(1, self.cfg.z_dim, f, h, w, dtype=torch.float32, device=x.device)
        weight = torch.zeros(h, w, dtype=torch.float32, device=x.device)
        for (r0, r1), (c0, c1), ramp in _tiles(h, w, tiling, scale=1, device=x.device):
            tile = self._tile(x[:, :, :, r0 * s : r1 * s, c0 * s : c1 * s])  # [1, 3, F, th*8, tw*8]
            mu[:, :, :, r0:r1, c0:c1] += self._encode_mu(tile) * ramp
            weight[r0:r1, c0:c1] += ramp
        return mu.div_(weight)

    @torch.no_grad()
    def decode(self, latents: Tensor, tiling: VaeTiling | None = None) -> Tensor:
        """latents: [Z, f, h, w] (normalised) -> video [3, 4(f-1)+1, 8h, 8w] in [-1, 1], float32.

        `tiling` (default `self.tiling`) decodes overlapping spatial tiles one after the other,
        each through the whole causal time loop with its own feature cache, and blends the pixels
        linearly in the overlaps; None or 1x1 is the single pass.
        """
        if latents.ndim != 4 or latents.shape[0] != self.cfg.z_dim:
            raise ValueError(
                f"VAE.decode expects latents [{self.cfg.z_dim}, f, h, w], got shape {tuple(latents.shape)}"
            )
        z = latents.unsqueeze(0).to(device=self.conv1.weight.device, dtype=torch.float32)  # [1, Z, f, h, w]
        mean, std = self._stats(z)
        x = self.conv2(self._prepare(z * std + mean))
        tiling = tiling if tiling is not None else self.tiling
        if tiling is not None and tiling.is_tiled:
            return self._decode_tiled(x, tiling)
        cache = FeatureCache()
        frames = [self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2).float().clamp_(-1, 1)[0].contiguous()

    def _decode_tiled(self, x: Tensor, tiling: VaeTiling) -> Tensor:
        """x: [1, Z, f, h, w] after conv2 -> video [3, F, 8h, 8w] float32, tile by tile.

        Each decoded frame group is added (weighted) straight into one float32 output, so the
        memory above the output is one tile's activations and feature cache.
        """
        _, _, f, h, w = x.shape
        s = self.cfg.spatial_stride
        frames = self.cfg.temporal_stride * (f - 1) + 1
        video = torch.zeros(1, 3, frames, h * s, w * s, dtype=torch.float32, device=x.device)
        weight = torch.zeros(h * s, w * s, dtype=torch.float32, device=x.device)
        for (r0, r1), (c0, c1), ramp in _tiles(h, w, tiling, scale=s, device=x.device):
            tile = self._tile(x[:, :, :, r0:r1, c0:c1])  # [1, Z, f, th, tw]
            region = video[:, :, :, r0 * s : r1 * s, c0 * s : c1 * s]  # a view: written in place
            cache, t = FeatureCache(), 0
            for i in range(f):
                y = self.decoder(tile[:, :, i : i + 1], cache)  # [1, 3, T, th*8, tw*8]
                region[:, :, t : t + y.shape[2]] += y.float() * ramp
                t += y.shape[2]
            weight[r0 * s : r1 * s, c0 * s : c1 * s] += ramp
        return video.div_(weight).clamp_(-1, 1)[0]

    def _tile(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


# Peak memory of one encode/decode call, for the memory plan: the bytes the call allocates
# above what is live before it (inputs and weights not counted, the returned tensor counted).
#
#   c = base_dim, e = bytes per element of the VAE dtype, P = video pixels of the largest tile
#   (8·th x 8·tw, the whole frame untiled), V = values of the whole video (3·F·H·W),
#   L = values of the latents (Z·f·h·w), A(op, e) = _ACTIVATION_BYTES below
#
#   decode, untiled: max(A·c·P + V·e, 2·V·e + 4·V·[e != 4])
#       the activations of one frame group (with every causal conv's feature cache) while the
#       decoded frames pile up in a list; at the end the list, its concatenation and the float32
#       copy (none when the VAE runs in float32)
#   decode, tiled:   4·V + 4·H·W + A·c·P + 3·T·P·(e + 8)
#       one float32 output the tiles are added into, the blend weights, one tile's activations,
#       and one tile's frame group (T = temporal stride) in the VAE dtype, in float32 and weighted
#   encode, untiled: V·e + A·c·P + 3·L·e
#       the video in the VAE dtype (a copy when the input's dtype or device differ), one frame
#       group's activations, the posterior (2Z channels) and its concatenation
#   encode, tiled:   V·e + 3·F·P·e + A·c·P + 3·L·e + 2·4·L
#       plus one tile's pixels (a contiguous copy) and the float32 blend of the means
#
# A is the peak of one steady-state frame group (4 video frames) per base channel and tile pixel,
# measured by counting every tensor storage the ops allocate (a TorchDispatchMode with weakref
# finalizers, op granularity) on the CPU for the released config (base_dim 96) at 32x32 to 64x64
# pixels and 2-5 latent frames (it scales with c·P; base_dim 16 gives the same per channel; the
# 2-frame case reads lowest): decode 178.7-180.2 B fp32, 89.3-102.1 B bf16 (the nearest-exact
# upsampling runs in float32); encode 125.8-138.6 B fp32, 63.2-70.4 B bf16. The table takes the
# maxima.
# The CPU check of the whole formula (same counter, base_dim 16, 5-11 latent frames, 1x1, 1x2 and
# 2x2 tiles) measured 0.97-0.98 of it for decode and 0.77-0.90 for encode (an fp32 input is not
# copied). On CUDA, torch.cuda.max_memory_allocated on an H200 with the full-size VAE (random
# weights, cudnn.benchmark on, 21 latent frames at 60x104 and 90x160, tiles 1x1 to 3x3):
# bf16 channels-last (the default) 0.975-0.996 of the formula (encode of 2 frames 0.89); fp32
# 1.16-1.20 (cuDNN's fp32 convolution workspace), hence `CUDA_FP32_MARGIN` on CUDA in fp32.
_ACTIVATION_BYTES = {("decode", 4): 180.5, ("decode", 2): 102.5, ("encode", 4): 139.0, ("encode", 2): 70.5}
CUDA_FP32_MARGIN = 1.25


def vae_peak_bytes(
    latent_shape: tuple[int, int, int],
    *,
    op: str = "decode",
    tiling: VaeTiling | None = None,
    dtype: torch.dtype = torch.bfloat16,
    cfg: VAEConfig = VAEConfig(),
    device_type: str = "cuda",
) -> int:
    """Estimated peak bytes one `decode` (or `encode`) of latents [Z, f, h, w] allocates.

    `latent_shape` is (f, h, w): latent frames, height and width (an 81-frame 480p chunk is
    (21, 60, 104)); for `encode`, the latents the video encodes to. On "cuda" in float32 the
    estimate includes `CUDA_FP32_MARGIN` (formula and calibration above).
    480p, 81 frames, bf16 on CUDA: 3.84 GiB untiled, 1.49 GiB 2x2, 0.98 GiB 3x3.
    """
    if op not in ("decode", "encode"):
        raise ValueError(f"op must be 'decode' or 'encode', got {op!r}")
    f, h, w = latent_shape
    if min(f, h, w) < 1:
        raise ValueError(f"latent_shape needs f, h, w >= 1, got {latent_shape}")
    e = torch.empty((), dtype=dtype).element_size()
    act_key = (op, 4 if e >= 4 else 2)
    s, t = cfg.spatial_stride, cfg.temporal_stride
    frames = t * (f - 1) + 1
    tiled = tiling is not None and tiling.is_tiled
    th, tw = tiling.tile_size(h, w) if tiling is not None and tiled else (h, w)
    pixels = th * s * tw * s  # P
    video = 3 * frames * h * s * w * s  # V
    latents = cfg.z_dim * f * h * w  # L
    act = _ACTIVATION_BYTES[act_key] * cfg.base_dim * pixels
    if op == "decode" and not tiled:
        peak = max(act + video * e, 2 * video * e + (4 * video if e != 4 else 0))
    elif op == "decode":
        peak = 4 * video + 4 * h * s * w * s + act + 3 * t * pixels * (e + 8)
    else:
        peak = video * e + act + 3 * latents * e + (3 * frames * pixels * e + 8 * latents if tiled else 0)
    if device_type == "cuda" and e >= 4:
        peak *= CUDA_FP32_MARGIN
    return int(peak)


def fit_tiling(
    latent_shape: tuple[int, int, int],
    budget_bytes: int,
    *,
    ops: tuple[str, ...] = ("decode", "encode"),
    dtype: torch.dtype = torch.bfloat16,
    cfg: VAEConfig = VAEConfig(),
    device_type: str = "cuda",
    overlap: int = 8,
    max_tiles: int = 8,
) -> VaeTiling:
    """The tiling with the fewest tiles whose `vae_peak_bytes` fits `budget_bytes` for every op
    in `ops` (1x1 when the whole chunk fits; of equal counts the lower peak).

    Raises ValueError naming the budget and the smallest peak any tiling up to
    `max_tiles` x `max_tiles` reaches when none fits.
    """
    _, h, w = latent_shape
    grids = sorted(
        (r * c, r, c) for r in range(1, min(max_tiles, h) + 1) for c in range(1, min(max_tiles, w) + 1)
    )
    chosen: tuple[int, VaeTiling] | None = None  # (peak, tiling): fewest tiles that fit, then lowest peak
    lowest: tuple[int, VaeTiling] | None = None
    for count, rows, cols in grids:
        if chosen is not None and count > chosen[1].rows * chosen[1].cols:
            break
        tiling = VaeTiling(rows=rows, cols=cols, overlap=overlap)
        peak = max(
            vae_peak_bytes(latent_shape, op=op, tiling=tiling, dtype=dtype, cfg=cfg, device_type=device_type)
            for op in ops
        )
        if lowest is None or peak < lowest[0]:
            lowest = (peak, tiling)
        if peak <= budget_bytes and (chosen is None or peak < chosen[0]):
            chosen = (peak, tiling)
    if chosen is None:
        assert lowest is not None
        raise ValueError(
            f"the VAE needs {lowest[0] / 2**30:.2f} GiB for latents {tuple(latent_shape)} even tiled "
            f"{lowest[1]}, more than the {budget_bytes / 2**30:.2f} GiB the budget leaves it"
        )
    return chosen[1]


def load_vae(
    weights_dir: Path,
    cfg: VAEConfig = VAEConfig(),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: Path | None = None,
    channels_last: bool = False,
) -> WanVAE:
    """Build the VAE on the meta device and load `<weights_dir>/Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth` strictly.

    `weights_dir` is the weights root (the folder holding `Wan2.1-I2V-14B-480P/`); `path` overrides
    the file. float32 is the reference's precision; `dtype=torch.bfloat16, channels_last=True` is the
    fast GPU setting (docs/parity-encoders.md gives the measured speed and drift). Inputs may live
    on any device; outputs are float32 on the model's device.
    Raises FileNotFoundError naming the file, or RuntimeError listing missing/unexpected keys.
    """
    file = path or Path(weights_dir) / "Wan2.1-I2V-14B-480P" / VAE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"VAE weights not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        model = WanVAE(cfg)
    _check_keys(model, state, file)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if channels_last:
        model.use_channels_last()
    return model.eval().requires_grad_(False)


def _check_keys(model: nn.Module, state: dict[str, Tensor], file: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"{file}: does not match VAEConfig: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)}), wrong shape "
            f"{[(k, tuple(state[k].shape), expected[k]) for k in wrong[:8]]} ({len(wrong)})"
        )


def checkpoint_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every key of `Wan2.1_VAE.pth` for this config with its shape (all float32 in the release)."""
    with torch.device("meta"):
        model = WanVAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
