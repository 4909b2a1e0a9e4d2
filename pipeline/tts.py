"""Voice a `tts_audio` job's text with Kokoro-82M, through the kokoro package (the `tts` extra).

Imported only for text-to-speech jobs. The model, its config and the voices come from
`<weights_dir>/Kokoro-82M` (never a download: the kokoro package would fetch from the Hub when
handed a repository id alone, so it is handed the local files). As the reference's TTS mode:
24 kHz speech, the text split on newlines, one speaker voiced as a whole; two speakers voiced turn
by turn (`(s1)`/`(s2)` marks), each speaker's track silent while the other speaks, so both tracks
have the same length and their sum is the conversation.

Kokoro's vocoder draws random noise: the speech is voiced under the job's seed (the global torch
generator forked for the call), so a retry voices the same speech. The model runs on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.tts_text import (
    KOKORO_CONFIG,
    KOKORO_DIR,
    KOKORO_REPO,
    KOKORO_WEIGHTS,
    SAMPLE_RATE,
    SPLIT_PATTERN,
    TtsRequest,
    TtsUnavailable,
    speaker_turns,
    unavailable,
    unknown_voice,
    voice_file,
)
from pipeline.types import GenerationRequest

_lock = threading.Lock()  # one voicing at a time: the kokoro pipeline and the forked RNG are shared
_models: dict[Path, Any] = {}
_pipelines: dict[tuple[Path, str], Any] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Voiced:
    """The voiced speech: one float32 track per speaker at `SAMPLE_RATE` (two: equal lengths)."""

    tracks: tuple[np.ndarray, ...]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return self.tracks[0].shape[0] / self.sample_rate


def kokoro_pipeline(weights_dir: Path, lang_code: str) -> Any:
    """A `kokoro.KPipeline` for `lang_code` on the model in `weights_dir/Kokoro-82M` (cached)."""
    from kokoro import KModel, KPipeline

    folder = (Path(weights_dir) / KOKORO_DIR).resolve()
    if folder not in _models:
        _models[folder] = KModel(
            repo_id=KOKORO_REPO, config=str(folder / KOKORO_CONFIG), model=str(folder / KOKORO_WEIGHTS)
        ).eval()
    key = (folder, lang_code)
    if key not in _pipelines:
        _pipelines[key] = KPipeline(lang_code=lang_code, repo_id=KOKORO_REPO, model=_models[folder])
    return _pipelines[key]


def say(pipeline: Any, text: str, voice: torch.Tensor, speed: float) -> torch.Tensor:
    """One speaker's speech for `text`: the kokoro pipeline's pieces (split on newlines) in order."""
    pieces = [r.audio for r in pipeline(text, voice=voice, speed=speed, split_pattern=SPLIT_PATTERN)]
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        raise ValueError(f"tts_audio.text: {text[:40]!r} gives no speech (no word Kokoro can voice)")
    return torch.cat(pieces)


def voice(request: TtsRequest, weights_dir: Path, *, seed: int) -> Voiced:
    """Voice `request` with the model and voices in `weights_dir`; `TtsUnavailable` naming what
    to install or download when a piece is missing, ValueError naming the field for a bad voice."""
    if (why := unavailable(weights_dir, request)) is not None:
        raise TtsUnavailable(why)
    if (why := unknown_voice(weights_dir, request)) is not None:
        raise ValueError(why)
    voices = [
        torch.load(voice_file(weights_dir, v), map_location="cpu", weights_only=True) for v in request.voices
    ]
    with _lock, torch.random.fork_rng(devices=[]):
        try:
            pipeline = kokoro_pipeline(weights_dir, request.lang_code)
        except (ImportError, OSError) as e:  # e.g. a model the G2P step would download
            raise TtsUnavailable(
                f"text-to-speech could not start for lang_code {request.lang_code!r}: {e}"
            ) from e
        torch.manual_seed(seed)  # after the (cached) set-up: the same draws on every call
        if len(voices) == 1:
            tracks = [say(pipeline, request.text, voices[0], request.speed)]
        else:
            turns: list[list[torch.Tensor]] = [[], []]
            for speaker, said in speaker_turns(request.text):
                speech = say(pipeline, said, voices[speaker - 1], request.speed)
                turns[speaker - 1].append(speech)
                turns[2 - speaker].append(torch.zeros_like(speech))
            tracks = [torch.cat(t) for t in turns]
    return Voiced(tracks=tuple(t.float().numpy() for t in tracks))


def write_tracks(voiced: Voiced, paths: tuple[Path, ...]) -> None:
    """Write each track (float WAV at its 24 kHz) to its path, atomically (a temporary name, then
    a rename), so a half-written file is never taken for the speech."""
    import soundfile as sf

    for track, path in zip(voiced.tracks, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        sf.write(str(tmp), track, voiced.sample_rate, subtype="FLOAT", format="WAV")
        os.replace(tmp, path)


def ensure_tiny_kokoro(weights_dir: Path) -> None:
    """A tiny model's weights folder gets the tiny Kokoro-82M on its first text-to-speech job
    (`infinitetalk weights tiny` writes it at once; the daemon's tiny fallback does not, to stay
    small): written beside, then renamed into place, so a concurrent writer is harmless."""
    folder = Path(weights_dir) / KOKORO_DIR
    if folder.exists() or importlib.util.find_spec("kokoro") is None:
        return
    from pipeline.tts_tiny import write_tiny_kokoro

    try:
        tmp = Path(tempfile.mkdtemp(prefix=".kokoro-", dir=weights_dir))
    except OSError:  # a read-only folder: `voice` then names what is missing
        return
    try:
        write_tiny_kokoro(tmp)
        os.rename(tmp / KOKORO_DIR, folder)
    except ImportError:  # a broken kokoro install: `voice` then names what is missing
        pass
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def voice_files(
    request: TtsRequest, weights_dir: Path, paths: tuple[Path, ...], *, seed: int, tiny: bool = False
) -> bool:
    """Voice `request` into `paths` (one per speaker) unless they are all there already (a retry
    keeps the speech of the first attempt); True when it voiced. `tiny`: a tiny model's folder,
    given the tiny Kokoro-82M when it has none."""
    if all(p.is_file() for p in paths):
        return False
    if tiny:
        ensure_tiny_kokoro(weights_dir)
    write_tracks(voice(request, weights_dir, seed=seed), paths)
    return True


def voice_request(request: GenerationRequest, weights_dir: Path, *, tiny: bool = False) -> float:
    """`voice_files` for a render request (`request.tts` into its `audio` paths, under its
    seed); returns the seconds it took."""
    t0 = time.perf_counter()
    if request.tts is not None:
        speaking = tuple(p for p in request.audio if p is not None)
        voice_files(request.tts, weights_dir, speaking, seed=request.seed, tiny=tiny)
    return time.perf_counter() - t0
