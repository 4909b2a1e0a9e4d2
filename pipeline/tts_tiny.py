"""A tiny random Kokoro model and voices in the released layout of hexgrad/Kokoro-82M, so the
tests and the demo voice a `tts_audio` job end to end on the CPU (`infinitetalk weights tiny`).

    Kokoro-82M/config.json        the released keys; a small ALBERT and one layer where the
                                  kokoro package allows (its decoder's widths are fixed)
    Kokoro-82M/kokoro-v1_0.pth    {module: state_dict} as released, random, stored as fp16
    Kokoro-82M/voices/<name>.pt   [510, 1, 256] style vectors, one row per phoneme count

The model is the kokoro package's own `KModel`, built from the config and saved untrained; its
durations are capped low (`max_dur`) so a sentence lasts about as long as spoken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.tts_text import KOKORO_CONFIG, KOKORO_DIR, KOKORO_REPO, KOKORO_WEIGHTS, VOICES_DIR

#: the voices written (American English female and male, as the released names)
TINY_VOICES = ("af_heart", "am_michael")
#: the symbols misaki writes (punctuation, letters, IPA and Kokoro's stress/tone marks)
_SYMBOLS = (
    ';:,.!?¡¿—…"«»“” '
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ɑɐɒæβɔɕçðʤəɚɛɜɟɡɥɨɪʝɯɰŋɲɴøɸθœɹɾɻʁʂʃʈʧʊʋʌɣɤχʎʒʔˈˌːʰʲ↓↑→↗↘ᵊᵻ"
)
_MODULES = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")


def tiny_kokoro_config() -> dict[str, Any]:
    """The released config's keys with small sizes (hidden_dim 512 and style_dim 128 are fixed
    by the kokoro package's decoder)."""
    vocab = {s: i + 1 for i, s in enumerate(dict.fromkeys(_SYMBOLS))}
    return {
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5]],
            "resblock_kernel_sizes": [3],
            "upsample_initial_channel": 512,
        },
        "dim_in": 64,
        "dropout": 0.2,
        "hidden_dim": 512,
        "max_conv_dim": 512,
        "max_dur": 6,
        "multispeaker": True,
        "n_layer": 1,
        "n_mels": 80,
        "n_token": len(vocab) + 1,
        "style_dim": 128,
        "text_encoder_kernel_size": 5,
        "plbert": {
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            "num_hidden_layers": 1,
            "dropout": 0.1,
        },
        "vocab": vocab,
    }


def write_tiny_kokoro(weights_dir: Path, seed: int = 0) -> Path:
    """Write `weights_dir/Kokoro-82M` (config, random weights, `TINY_VOICES`); returns the folder."""
    from kokoro import KModel

    folder = Path(weights_dir) / KOKORO_DIR
    (folder / VOICES_DIR).mkdir(parents=True, exist_ok=True)
    config = folder / KOKORO_CONFIG
    config.write_text(json.dumps(tiny_kokoro_config(), indent=1, ensure_ascii=False) + "\n")
    empty = folder / ".empty.pth"
    torch.save({}, empty)  # KModel loads no tensor from it: its modules keep their random init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KModel(repo_id=KOKORO_REPO, config=str(config), model=str(empty))
        state = {m: {k: v.half() for k, v in getattr(model, m).state_dict().items()} for m in _MODULES}
        gen = torch.Generator().manual_seed(seed + 1)
        voices = {name: torch.randn(510, 1, 256, generator=gen) * 0.5 for name in TINY_VOICES}
    empty.unlink()
    torch.save(state, folder / KOKORO_WEIGHTS)
    for name, pack in voices.items():
        torch.save(pack, folder / VOICES_DIR / f"{name}.pt")
    return folder
