"""Speech input: decode, resample to 16 kHz mono, loudness-normalise, compose two speakers.

    load_speech(paths, audio_type) -> Speech     one track per speaker + their mix, float32 16 kHz
    AudioEncoder.audio_features(track) -> [T, K, Dh]   (pipeline.models.wav2vec)

As the reference: `librosa.load(path, sr=16000)` (channel average, soxr_hq resampling), then
per track BS.1770 integrated loudness (pyloudnorm) and a plain gain to -23 LUFS, skipped when the
measured loudness is beyond +-100 LUFS (silence). Two speakers: `para` keeps both tracks as they
are (both speak at once); `add` puts person 2 after person 1, each track zero-padded with the
other's length of silence. The mix (what the video plays) is the sum of the two tracks.

Formats: everything libsndfile reads (wav, flac, ogg, mp3, aiff, ...) goes through librosa;
other containers (m4a/aac, mp4, mov, mkv, webm) are decoded with PyAV and resampled with the same
librosa resampler. Extensions do not matter (upper case included): the decoder decides.
librosa, soundfile, pyloudnorm and av are imported inside the functions (the GPU image may lack them).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.av_input import open_input

SAMPLE_RATE = 16000
TARGET_LUFS = -23.0
MIN_SECONDS = 0.4  # BS.1770 gating block: shorter audio has no integrated loudness


class AudioError(ValueError):
    """A speech file that cannot be used; `path` names it, `reason` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Speech:
    """Prepared speech: one float32 16 kHz mono track per speaker (all the same length) and the mix."""

    tracks: tuple[np.ndarray, ...]
    mix: np.ndarray
    sample_rate: int = SAMPLE_RATE

    @property
    def num_samples(self) -> int:
        return int(self.mix.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    def num_frames(self, fps: int = 25) -> int:
        """Video frames the speech covers, int(seconds * fps) as the reference."""
        return int(self.num_samples / self.sample_rate * fps)


def read_audio(path: Path | str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any audio (or the audio stream of a video) to float32 mono at `sample_rate`.

    Raises AudioError naming the file if it is missing, cannot be decoded, or holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    import soundfile

    try:
        soundfile.info(str(path))
        readable_by_sndfile = True
    except Exception:  # noqa: BLE001 - libsndfile says "not mine"; PyAV gets a try below
        readable_by_sndfile = False
    try:
        if readable_by_sndfile:
            import librosa

            audio, _ = librosa.load(str(path), sr=sample_rate, mono=True)
        else:
            audio = _read_with_pyav(path, sample_rate)
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a clear input error
        raise AudioError(path, f"cannot decode audio ({type(e).__name__}: {e})") from e
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise AudioError(path, "no audio samples")
    if not np.isfinite(audio).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    return audio


def _read_with_pyav(path: Path, sample_rate: int) -> np.ndarray:
    import librosa

    try:
        container = open_input(path)
    except Exception as e:  # noqa: BLE001
        raise AudioError(path, f"cannot decode audio ({type(e).__name__}: {e})") from e
    with container:
        if not container.streams.audio:
            raise AudioError(path, "no audio stream")
        stream = container.streams.audio[0]
        native_rate = stream.codec_context.sample_rate or stream.rate
        chunks = []
        for frame in container.decode(stream):
            data = frame.to_ndarray()  # planar: [channels, n]; packed: [1, n * channels]
            if not frame.format.is_planar:
                data = data.reshape(-1, len(frame.layout.channels)).T
            chunks.append(_to_float(data))
    if not chunks:
        raise AudioError(path, "no audio samples")
    audio = librosa.to_mono(np.concatenate(chunks, axis=1))
    if native_rate != sample_rate:
        audio = librosa.resample(audio, orig_sr=native_rate, target_sr=sample_rate, res_type="soxr_hq")
    return audio


def _to_float(data: np.ndarray) -> np.ndarray:
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32)
    scale = float(np.iinfo(data.dtype).max) + 1.0
    return (data.astype(np.float32) / scale).astype(np.float32)


def loudness_norm(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, lufs: float = TARGET_LUFS) -> np.ndarray:
    """Gain to `lufs` integrated loudness (BS.1770); unchanged if the loudness is beyond +-100 LUFS."""
    import pyloudnorm

    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio)
    if abs(loudness) > 100:
        return audio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Possible clipped samples": the reference keeps them too
        return pyloudnorm.normalize.loudness(audio, loudness, lufs).astype(np.float32)


def prepare_track(
    path: Path | str, sample_rate: int = SAMPLE_RATE, min_seconds: float = MIN_SECONDS, loudness: bool = True
) -> np.ndarray:
    """read_audio + loudness_norm (unless not `loudness`), with AudioError for audio shorter than
    `min_seconds`."""
    audio = read_audio(path, sample_rate)
    seconds = audio.shape[0] / sample_rate
    if seconds < max(min_seconds, MIN_SECONDS):
        raise AudioError(
            path, f"audio too short: {seconds:.2f} s, needs at least {max(min_seconds, MIN_SECONDS):.2f} s"
        )
    return loudness_norm(audio, sample_rate) if loudness else audio


def compose(tracks: Sequence[np.ndarray], audio_type: str) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Two speakers: `para` (together; the shorter zero-padded at the end) or `add` (one after the other)."""
    if len(tracks) == 1:
        return (tracks[0],), tracks[0]
    if len(tracks) != 2:
        raise ValueError(f"one or two speech tracks are supported, got {len(tracks)}")
    first, second = tracks
    if audio_type == "para":
        length = max(first.shape[0], second.shape[0])
        first, second = (np.pad(t, (0, length - t.shape[0])) for t in (first, second))
    elif audio_type == "add":
        first, second = (
            np.concatenate([first, np.zeros(second.shape[0], np.float32)]),
            np.concatenate([np.zeros(first.shape[0], np.float32), second]),
        )
    else:
        raise ValueError(f"audio_type must be 'para' or 'add', got {audio_type!r}")
    return (first, second), (first + second).astype(np.float32)


def load_speech(
    paths: Sequence[Path | str | None],
    audio_type: str = "para",
    *,
    min_seconds: float = MIN_SECONDS,
    loudness: bool = True,
) -> Speech:
    """Load one or two speech files (person1, person2) ready for `audio_features`.

    Each file: decoded, 16 kHz mono, loudness-normalised; then composed by `audio_type`.
    `min_seconds` is checked per file (the caller passes what the model needs, e.g. frame_num / 25).
    One of two speakers may be `None`: silent, zeros as long as the other's track (the reference's
    `"None"` speaker; the zeros are not loudness-normalised).
    """
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"load_speech takes one or two files, got {len(paths)}")
    if all(p is None for p in paths):
        raise ValueError(f"at most one of two speakers can be silent (None), got {list(paths)}")
    loaded = [None if p is None else prepare_track(p, SAMPLE_RATE, min_seconds, loudness) for p in paths]
    speaking = next(t for t in loaded if t is not None)
    tracks = [np.zeros(speaking.shape[0], np.float32) if t is None else t for t in loaded]
    composed, mix = compose(tracks, audio_type)
    return Speech(tracks=composed, mix=mix)
