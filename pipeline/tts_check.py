"""`infinitetalk weights check` for Kokoro-82M (text-to-speech jobs): optional, so an absent
`Kokoro-82M/` folder is a note; files that are there are read and checked."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.tts_text import KOKORO_CONFIG, KOKORO_DIR, KOKORO_WEIGHTS, VOICES_DIR, known_voices
from pipeline.weights_check import Finding

#: the released config's keys the kokoro package reads
CONFIG_KEYS = (
    "istftnet",
    "hidden_dim",
    "max_dur",
    "n_layer",
    "n_mels",
    "n_token",
    "style_dim",
    "plbert",
    "vocab",
)
#: the modules of the released weights file ({module: state_dict})
MODULES = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
_WHY = "optional: text-to-speech jobs (tts_audio) need it; `infinitetalk weights download` fetches it"


def check_kokoro(weights_dir: Path) -> list[Finding]:
    root = Path(weights_dir) / KOKORO_DIR
    if not root.is_dir():
        return [Finding(path=f"{KOKORO_DIR}/", status="note", detail=f"not present ({_WHY})")]
    return [_check_config(root), _check_model(root), _check_voices(weights_dir)]


def _check_config(root: Path) -> Finding:
    rel = f"{KOKORO_DIR}/{KOKORO_CONFIG}"
    try:
        config = json.loads((root / KOKORO_CONFIG).read_text())
    except FileNotFoundError:
        return Finding(path=rel, status="missing", detail=f"file not present ({_WHY})")
    except (OSError, ValueError) as e:
        return Finding(path=rel, status="wrong", detail=f"cannot read: {e}")
    absent = [k for k in CONFIG_KEYS if k not in config] if isinstance(config, dict) else list(CONFIG_KEYS)
    if absent:
        return Finding(path=rel, status="wrong", detail=f"missing keys: {', '.join(absent)}")
    return Finding(
        path=rel, status="ok", detail=f"{len(config['vocab'])} phonemes, hidden_dim {config['hidden_dim']}"
    )


def _check_model(root: Path) -> Finding:
    rel = f"{KOKORO_DIR}/{KOKORO_WEIGHTS}"
    if not (root / KOKORO_WEIGHTS).is_file():
        return Finding(path=rel, status="missing", detail=f"file not present ({_WHY})")
    import torch

    try:
        state = torch.load(root / KOKORO_WEIGHTS, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # an unreadable file is a finding, not a crash of the check
        return Finding(path=rel, status="wrong", detail=f"cannot read: {type(e).__name__}: {e}")
    absent = [m for m in MODULES if not isinstance(state, dict) or m not in state]
    if absent:
        return Finding(path=rel, status="wrong", detail=f"missing modules: {', '.join(absent)}")
    tensors = sum(len(state[m]) for m in MODULES)
    return Finding(path=rel, status="ok", detail=f"{len(MODULES)} modules, {tensors} tensors")


def _check_voices(weights_dir: Path) -> Finding:
    rel = f"{KOKORO_DIR}/{VOICES_DIR}/"
    voices = known_voices(weights_dir)
    if not voices:
        return Finding(path=rel, status="missing", detail=f"no voice (*.pt) present ({_WHY})")
    shown = ", ".join(voices[:8]) + (", ..." if len(voices) > 8 else "")
    return Finding(path=rel, status="ok", detail=f"{len(voices)} voices: {shown}")
