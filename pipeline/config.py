"""Model hyper-parameters: one frozen dataclass per model, composed into `ModelConfig`.

`load_model_config(weights_dir)` is the single place that decides the shapes of every model:
- a folder written by `infinitetalk weights tiny` carries `tiny.json`, which gives every
  hyper-parameter (sections "dit", "vae", "t5", "clip", "wav2vec2", "buckets", "generation");
- a folder with the released weights gets the full-size defaults below, the DiT part read from
  `Wan2.1-I2V-14B-480P/config.json` as the reference does.

The encoder configs (VAEConfig, T5Config, ClipConfig, Wav2VecConfig) live beside their models in
`pipeline/models/`; they are imported when a config is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.weights_layout import TINY_MARKER as TINY_JSON
from pipeline.weights_layout import WAN_DIR

if TYPE_CHECKING:
    from pipeline.models.clip import ClipConfig
    from pipeline.models.t5 import T5Config
    from pipeline.models.vae import VAEConfig
    from pipeline.models.wav2vec import Wav2VecConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DiTConfig:
    """The InfiniteTalk DiT (Wan2.1-I2V-14B + audio adapter). Defaults are the released model.

    The first group mirrors the keys of the official `config.json`; the audio and CLIP widths are
    constants in the reference code and fields here so a tiny model can shrink them.
    """

    # Wan2.1-I2V-14B (`config.json`)
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # InfiniteTalk audio adapter
    audio_window: int = 5  # audio frames around each video frame
    vae_scale: int = 4  # video frames per latent frame (VAE time stride)
    audio_blocks: int = 12  # wav2vec2 transformer layers stacked
    audio_channels: int = 768  # wav2vec2 hidden size
    intermediate_dim: int = 512  # AudioProjModel hidden width
    output_dim: int = 768  # width of the audio context tokens
    context_tokens: int = 32  # audio tokens per latent frame and speaker
    class_range: int = 24  # speaker RoPE: person 1 in [0, interval], person 2 in [range-interval, range]
    class_interval: int = 4
    # CLIP image features entering `img_emb`
    clip_dim: int = 1280
    clip_tokens: int = 257
    # 3-D RoPE table
    rope_max_len: int = 1024
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0 or (self.dim // self.num_heads) % 2 != 0:
            raise ValueError(
                f"dim ({self.dim}) must split into num_heads ({self.num_heads}) heads of even size"
            )
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {self.patch_size!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_window_vf(self) -> int:
        """Audio frames seen by a latent frame after the first (8 for the released model)."""
        return self.audio_window + self.vae_scale - 1

    @classmethod
    def from_wan_json(cls, data: dict[str, Any]) -> DiTConfig:
        """Build from the official `config.json` (keys starting with `_` are metadata).

        Keys this config does not know are ignored with a warning (`ignored_wan_keys`), as the
        reference ignores what its model does not use; a hub revision may add one. Model options
        that our DiT implements with one value only must have that value (`FIXED_WAN_OPTIONS`).
        """
        values = {k: v for k, v in data.items() if not k.startswith("_")}
        model_type = values.pop("model_type", "i2v")
        if model_type != "i2v":
            raise ValueError(
                f"InfiniteTalk needs the i2v Wan model, config.json says model_type={model_type!r}"
            )
        for key, fixed in FIXED_WAN_OPTIONS.items():
            if key in values and _tuplify(values.pop(key)) != fixed:
                raise ValueError(
                    f"config.json: {key}={data[key]!r} is not supported (InfiniteTalk's DiT has {key}={fixed!r})"
                )
        ignored = ignored_wan_keys(data)
        if ignored:
            logger.warning(
                "config.json: ignoring keys InfiniteTalk's DiT does not use: %s", ", ".join(ignored)
            )
        return _from_dict(cls, {k: v for k, v in values.items() if k not in ignored}, "config.json")


#: WanModel options of the reference that our DiT implements with this value only
FIXED_WAN_OPTIONS: dict[str, Any] = {
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "norm_input_visual": True,
    "norm_output_audio": True,
}


def ignored_wan_keys(data: dict[str, Any]) -> list[str]:
    """Keys of a Wan `config.json` that `DiTConfig.from_wan_json` ignores (with a warning)."""
    known = {f.name for f in dataclasses.fields(DiTConfig)} | set(FIXED_WAN_OPTIONS) | {"model_type"}
    return sorted(k for k in data if not k.startswith("_") and k not in known)


# Resolution buckets of the released model, [H, W] in pixels, in the reference's table order
# (InfiniteTalk `ASPECT_RATIO_627` for 480p and `ASPECT_RATIO_960` for 720p).
FULL_BUCKETS: dict[str, tuple[tuple[int, int], ...]] = {
    "infinitetalk-480": (
        (320, 1216),
        (384, 1024),
        (448, 896),
        (512, 768),
        (576, 704),
        (640, 640),
        (704, 576),
        (768, 512),
        (832, 448),
        (896, 448),
        (960, 384),
        (1088, 384),
        (1152, 320),
        (1216, 320),
        (1280, 320),
    ),
    "infinitetalk-720": (
        (448, 2048),
        (512, 1792),
        (576, 1600),
        (640, 1408),
        (704, 1280),
        (768, 1216),
        (832, 1088),
        (896, 1024),
        (960, 960),
        (1024, 896),
        (1088, 832),
        (1152, 768),
        (1216, 768),
        (1280, 704),
        (1344, 704),
        (1408, 640),
        (1472, 640),
        (1536, 576),
        (1664, 576),
        (1856, 512),
        (1920, 512),
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationConfig:
    """Chunking defaults of the model: frames per chunk and motion frames carried over."""

    frame_num: int = 81
    motion_frame: int = 9

    def __post_init__(self) -> None:
        if self.frame_num < 5 or (self.frame_num - 1) % 4 != 0:
            raise ValueError(f"frame_num must be 4n+1 and at least 5, got {self.frame_num}")
        if self.motion_frame < 1 or (self.motion_frame - 1) % 4 != 0 or self.motion_frame >= self.frame_num:
            raise ValueError(
                f"motion_frame must be 4n+1 and below frame_num ({self.frame_num}), got {self.motion_frame}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Every hyper-parameter of the InfiniteTalk stack for one weights folder."""

    dit: DiTConfig
    vae: VAEConfig
    t5: T5Config
    clip: ClipConfig
    wav2vec2: Wav2VecConfig
    buckets: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=lambda: dict(FULL_BUCKETS))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    is_tiny: bool = False


def _from_dict(cls: Any, values: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass from JSON values; unknown keys are an error naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        # JSON has no tuples; config fields holding tuples get them back as tuples
        if isinstance(value, list):
            value = _tuplify(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def parse_buckets(data: dict[str, Any], where: str) -> dict[str, tuple[tuple[int, int], ...]]:
    buckets: dict[str, tuple[tuple[int, int], ...]] = {}
    for name, sizes in data.items():
        parsed = []
        for size in sizes:
            if len(size) != 2 or any(int(v) % 16 != 0 or int(v) <= 0 for v in size):
                raise ValueError(f"{where}: bucket {name!r} size {size!r} must be [H, W], multiples of 16")
            parsed.append((int(size[0]), int(size[1])))
        if not parsed:
            raise ValueError(f"{where}: bucket {name!r} has no sizes")
        buckets[name] = tuple(parsed)
    return buckets


def load_model_config(weights_dir: Path) -> ModelConfig:
    """Hyper-parameters for the weights in `weights_dir` (tiny.json, or full size + config.json)."""
    from pipeline.models.clip import ClipConfig
    from pipeline.models.t5 import T5Config
    from pipeline.models.vae import VAEConfig
    from pipeline.models.wav2vec import Wav2VecConfig

    weights_dir = Path(weights_dir)
    tiny_path = weights_dir / TINY_JSON
    if tiny_path.is_file():
        try:
            data = json.loads(tiny_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{tiny_path}: not valid JSON ({e})") from e
        sections = ("dit", "vae", "t5", "clip", "wav2vec2", "buckets", "generation")
        missing = [s for s in sections if s not in data]
        if missing:
            raise ValueError(f"{tiny_path}: missing sections {missing}")
        return ModelConfig(
            dit=_from_dict(DiTConfig, data["dit"], f"{tiny_path} [dit]"),
            vae=_from_dict(VAEConfig, data["vae"], f"{tiny_path} [vae]"),
            t5=_from_dict(T5Config, data["t5"], f"{tiny_path} [t5]"),
            clip=_from_dict(ClipConfig, data["clip"], f"{tiny_path} [clip]"),
            wav2vec2=_from_dict(Wav2VecConfig, data["wav2vec2"], f"{tiny_path} [wav2vec2]"),
            buckets=parse_buckets(data["buckets"], f"{tiny_path} [buckets]"),
            generation=_from_dict(GenerationConfig, data["generation"], f"{tiny_path} [generation]"),
            is_tiny=True,
        )
    wan_json = weights_dir / WAN_DIR / "config.json"
    if not wan_json.is_file():
        raise FileNotFoundError(
            f"{weights_dir} has neither {TINY_JSON} nor {WAN_DIR}/config.json; "
            "fetch the weights with `infinitetalk weights download` or write tiny ones with `weights tiny`"
        )
    return ModelConfig(
        dit=DiTConfig.from_wan_json(json.loads(wan_json.read_text())),
        vae=VAEConfig(),
        t5=T5Config(),
        clip=ClipConfig(),
        wav2vec2=Wav2VecConfig(),
    )
