"""chinese-wav2vec2-base speech features at the video frame rate (transformers `Wav2Vec2Model`).

Shape legend
    N samples at 16 kHz · T50 CNN frames (50 Hz) · T video frames (25 fps) = int(N / 16000 * 25)
    K transformer layers (12) · Dh hidden width (768)
    audio_features(speech [N], num_frames=T) -> [T, K, Dh] float32

What the reference does and we reproduce: the folder's `Wav2Vec2FeatureExtractor` (normalisation
as its preprocessor_config.json says), the CNN feature encoder, then *linear interpolation of the
512-channel CNN features to T frames* (align_corners=True) before the feature projection, so the
transformer runs at 25 Hz; the outputs of all K transformer layers are stacked (the embedding
output, hidden_states[0], is dropped). Eval mode: no SpecAugment masking, no LayerDrop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

WAV2VEC_DIR = "chinese-wav2vec2-base"
#: tensors of the hub's Wav2Vec2ForPreTraining checkpoint that Wav2Vec2Model does not have
PRETRAINING_HEADS = ("quantizer.", "project_hid.", "project_q.")

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Wav2VecConfig:
    """What the pipeline needs to know about the speech encoder (the network itself comes from the
    folder's config.json). Defaults: chinese-wav2vec2-base and the reference's audio settings."""

    hidden_size: int = 768
    num_layers: int = 12
    sample_rate: int = 16000
    fps: int = 25
    target_lufs: float = -23.0


class AudioEncoder:
    """Feature extractor + Wav2Vec2Model on one device. Call `audio_features(speech)`."""

    def __init__(self, model: torch.nn.Module, extractor: Any, cfg: Wav2VecConfig) -> None:
        #: a transformers Wav2Vec2Model (its submodules are reached by name: typed loosely)
        self.model: Any = model
        self.extractor = extractor
        self.cfg = cfg
        # the layer outputs are collected by hooks on the shared module: one call at a time
        self._hooks_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        """Video frames covered by `num_samples` of speech: int(seconds * fps), as the reference."""
        return int(num_samples / self.cfg.sample_rate * self.cfg.fps)

    @torch.no_grad()
    def audio_features(self, speech: np.ndarray, num_frames: int | None = None) -> Tensor:
        """speech [N] float (16 kHz mono) -> [T, K, Dh] float32 on the CPU.

        T = num_frames, or int(N / 16000 * 25) when None (the reference's rule).
        """
        speech = np.asarray(speech)
        if speech.ndim != 1:
            raise ValueError(f"audio_features expects mono speech [N], got shape {speech.shape}")
        frames = self.num_frames(len(speech)) if num_frames is None else num_frames
        if frames < 1:
            raise ValueError(f"speech of {len(speech)} samples is shorter than one video frame")
        values = self.extractor(speech, sampling_rate=self.cfg.sample_rate).input_values
        x = torch.from_numpy(np.asarray(values[0], dtype=np.float32)).to(self.device)[None]  # [1, N]
        x = x.to(next(self.model.parameters()).dtype)
        cnn = self.model.feature_extractor(x)  # [1, C, T50]
        cnn = F.interpolate(cnn, size=frames, mode="linear", align_corners=True)  # [1, C, T]
        hidden, _ = self.model.feature_projection(cnn.transpose(1, 2))  # [1, T, Dh]
        layers = self._encode_layers(hidden)  # K x [1, T, Dh]
        return torch.stack(layers, dim=2)[0].float().cpu()  # [T, K, Dh]

    def _encode_layers(self, hidden: Tensor) -> list[Tensor]:
        """Run the transformer encoder and collect every layer's output (forward hooks)."""
        outputs: list[Tensor] = []

        def keep(_module: torch.nn.Module, _args: object, output: object) -> None:
            outputs.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]

        with self._hooks_lock:
            handles = [layer.register_forward_hook(keep) for layer in self.model.encoder.layers]
            try:
                self.model.encoder(hidden)
            finally:
                for handle in handles:
                    handle.remove()
        if len(outputs) != len(self.model.encoder.layers):
            raise RuntimeError(f"expected {len(self.model.encoder.layers)} layer outputs, got {len(outputs)}")
        return outputs


def load_wav2vec(
    weights_dir: Path,
    cfg: Wav2VecConfig = Wav2VecConfig(),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AudioEncoder:
    """Load `<weights_dir>/chinese-wav2vec2-base/` (config.json, preprocessor_config.json and
    pytorch_model.bin or model.safetensors, hub key names). The pre-training heads in the file
    (`quantizer.*`, `project_hid`, `project_q`) are not part of Wav2Vec2Model and are ignored; a
    missing model tensor is an error. float32 on the CPU by default, as the reference."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = Path(weights_dir) / WAV2VEC_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"wav2vec2 folder not found or incomplete (no config.json): {folder}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the pre-training heads as "unexpected"
    try:
        # no dtype argument: transformers names it `torch_dtype` before 4.56 and `dtype` after;
        # the file's float32 tensors are converted below instead, the same under every version
        model, info = Wav2Vec2Model.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = sorted(info.get("unexpected_keys", []))
    heads = [k for k in unexpected if not k.startswith(PRETRAINING_HEADS)]
    if heads:
        raise RuntimeError(f"{folder}: unknown tensors in the wav2vec2 weights: {heads[:8]} ({len(heads)})")
    logger.debug("wav2vec2: ignored pre-training tensors %s", unexpected)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise RuntimeError(
            f"{folder}: wav2vec2 weights incomplete: missing {sorted(info.get('missing_keys', []))[:8]}, "
            f"mismatched {list(info.get('mismatched_keys', []))[:8]}"
        )
    if model.config.hidden_size != cfg.hidden_size or model.config.num_hidden_layers != cfg.num_layers:
        raise ValueError(
            f"{folder}/config.json: hidden_size={model.config.hidden_size}, "
            f"num_hidden_layers={model.config.num_hidden_layers}; "
            f"expected {cfg.hidden_size} and {cfg.num_layers}"
        )
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    return AudioEncoder(model.to(device=device, dtype=dtype).eval().requires_grad_(False), extractor, cfg)
