"""Speech loading and wav2vec2 features: parity with the reference, formats, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from pipeline.audio import AudioError, compose, load_speech, loudness_norm, read_audio
from pipeline.models.wav2vec import AudioEncoder, Wav2VecConfig, load_wav2vec
from pipeline.tiny_encoders import TINY_WAV2VEC, state_digest
from tests.helpers.media import make_audio, make_mp4, make_wav
from tests.helpers.parity import rel_err

PARITY = "encoders_audio"  # the reference's tensors, as the `ref` / `ref_meta` fixtures (conftest.py)
PARITY_RTOL = 1e-4


def lufs(x: np.ndarray) -> float:
    import pyloudnorm

    return float(pyloudnorm.Meter(16000).integrated_loudness(x))


@pytest.fixture(scope="module")
def inputs(ref: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The reference's two input files, rebuilt bit-exactly from the stored PCM."""
    folder = tmp_path_factory.mktemp("speech")
    p1, p2 = folder / "p1.WAV", folder / "p2.flac"
    soundfile.write(p1, ref["raw1"].numpy(), 22050, subtype="PCM_16", format="WAV")
    soundfile.write(p2, ref["raw2"].numpy(), 44100, subtype="PCM_16", format="FLAC")
    return p1, p2


@pytest.fixture(scope="module")
def encoder(weights: Path) -> AudioEncoder:
    return load_wav2vec(weights, TINY_WAV2VEC)


def test_fixture_was_made_from_these_weights(weights: Path, ref_meta: dict[str, str]) -> None:
    from safetensors.torch import load_file as load

    state = load(str(weights / "chinese-wav2vec2-base" / "model.safetensors"))
    assert state_digest(state) == ref_meta["wav2vec_digest"], (
        "tiny wav2vec2 weights changed: rerun tools/parity"
    )
    bin_state = torch.load(weights / "chinese-wav2vec2-base" / "pytorch_model.bin", weights_only=True)
    assert state_digest(bin_state) == ref_meta["wav2vec_digest"]
    assert any(k.startswith("quantizer.") for k in state) and all(
        k.startswith(("wav2vec2.", "quantizer.", "project_")) for k in state
    )


def test_single_track_matches_reference(inputs: tuple[Path, Path], ref: dict[str, torch.Tensor]) -> None:
    speech = load_speech([inputs[0]])  # 22.05 kHz stereo, upper-case .WAV
    assert len(speech.tracks) == 1 and speech.tracks[0].dtype == np.float32
    assert rel_err(speech.tracks[0], ref["single"]) <= 1e-6
    assert speech.duration_s == pytest.approx(1.5, abs=1e-3)
    assert speech.num_frames() == 37
    assert lufs(speech.tracks[0]) == pytest.approx(-23.0, abs=0.05)


def test_add_matches_reference(inputs: tuple[Path, Path], ref: dict[str, torch.Tensor]) -> None:
    speech = load_speech(list(inputs), "add")  # person 2 is a 44.1 kHz mono FLAC
    assert rel_err(speech.tracks[0], ref["add1"]) <= 1e-6
    assert rel_err(speech.tracks[1], ref["add2"]) <= 1e-6
    assert rel_err(speech.mix, ref["add_mix"]) <= 1e-6
    n1 = int(1.5 * 16000)
    assert not speech.tracks[0][n1:].any() and not speech.tracks[1][:n1].any()


def test_para_matches_reference(inputs: tuple[Path, Path], ref: dict[str, torch.Tensor]) -> None:
    speech = load_speech([inputs[0], inputs[0]], "para")
    assert rel_err(speech.mix, ref["para_mix"]) <= 1e-6


def test_para_pads_the_shorter_track(inputs: tuple[Path, Path]) -> None:
    """The reference fails on unequal `para` lengths; we pad the shorter track with silence."""
    speech = load_speech(list(inputs), "para")
    n1, n2 = int(1.5 * 16000), int(1.2 * 16000)
    assert speech.tracks[0].shape == speech.tracks[1].shape == (n1,)
    assert not speech.tracks[1][n2:].any() and speech.tracks[1][: n2 - 100].any()
    with pytest.raises(ValueError, match="'both'"):
        compose([np.zeros(3, np.float32)] * 2, "both")


def test_features_match_reference(
    encoder: AudioEncoder, inputs: tuple[Path, Path], ref: dict[str, torch.Tensor]
) -> None:
    single = encoder.audio_features(load_speech([inputs[0]]).tracks[0])
    assert single.shape == (37, 2, 16) and single.dtype == torch.float32  # [T, layers, hidden]
    assert rel_err(single, ref["emb_single"]) <= PARITY_RTOL
    speech = load_speech(list(inputs), "add")
    assert rel_err(encoder.audio_features(speech.tracks[0]), ref["emb_add1"]) <= PARITY_RTOL
    assert rel_err(encoder.audio_features(speech.tracks[1]), ref["emb_add2"]) <= PARITY_RTOL


def test_features_take_an_explicit_frame_count(encoder: AudioEncoder, inputs: tuple[Path, Path]) -> None:
    track = load_speech([inputs[0]]).tracks[0]
    assert encoder.audio_features(track, num_frames=12).shape == (12, 2, 16)
    with pytest.raises(ValueError, match="mono speech"):
        encoder.audio_features(np.zeros((2, 16000), np.float32))


@pytest.mark.parametrize("name", ["voice.mp3", "voice.OGG", "voice.m4a", "VOICE.FLAC", "voice.wav"])
def test_compressed_formats_load(tmp_path: Path, name: str) -> None:
    path = make_audio(tmp_path / name, duration_s=1.0, rate=44100, channels=2, seed=1)
    speech = load_speech([path])
    assert speech.duration_s == pytest.approx(1.0, abs=0.08)  # codec priming/padding
    assert lufs(speech.tracks[0]) == pytest.approx(-23.0, abs=0.3)


def test_audio_track_of_a_video_loads(tmp_path: Path) -> None:
    path = make_mp4(tmp_path / "clip.MP4")
    audio = read_audio(path)
    assert audio.ndim == 1 and audio.size > 16000 * 0.5


def test_channels_are_averaged(tmp_path: Path) -> None:
    left = np.sin(np.linspace(0, 400, 16000)).astype(np.float32) * 0.5
    soundfile.write(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], 1), 16000, subtype="FLOAT")
    assert np.allclose(read_audio(tmp_path / "s.wav"), left / 2, atol=1e-6)


def test_silence_is_left_unchanged(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    speech = load_speech([tmp_path / "quiet.wav"])
    assert not speech.tracks[0].any()
    assert loudness_norm(np.zeros(8000, np.float32)).shape == (8000,)


def test_errors_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "broken.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(AudioError, match=r"broken\.wav: cannot decode"):
        load_speech([garbage])
    short = make_wav(tmp_path / "short.wav", duration_s=0.2, rate=16000, channels=1)
    with pytest.raises(AudioError, match=r"short\.wav: audio too short: 0\.20 s"):
        load_speech([short])
    long_enough = make_wav(tmp_path / "ok.wav", duration_s=1.0, rate=16000, channels=1)
    with pytest.raises(AudioError, match=r"ok\.wav: audio too short: 1\.00 s, needs at least 3\.28 s"):
        load_speech([long_enough], min_seconds=82 / 25)
    with pytest.raises(AudioError, match=r"missing\.mp3: file not found"):
        load_speech([tmp_path / "missing.mp3"])
    with pytest.raises(ValueError, match="one or two"):
        load_speech([long_enough] * 3)


def test_wav2vec_folder_errors(tmp_path: Path, weights: Path) -> None:
    with pytest.raises(FileNotFoundError, match="chinese-wav2vec2-base"):
        load_wav2vec(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=16"):
        load_wav2vec(weights, Wav2VecConfig())


@pytest.mark.parametrize("audio_type", ["add", "para"])
@pytest.mark.parametrize("silent", [0, 1])
def test_silent_speaker_matches_reference(
    inputs: tuple[Path, Path], ref: dict[str, torch.Tensor], audio_type: str, silent: int
) -> None:
    """The reference's `"None"` speaker: zeros as long as the other's (loudness-normalised) track,
    then composed as usual; `add` puts the silence before (person 1) or after (person 2) the speech."""
    speaking = ref["single"].numpy()  # the reference's audio_prepare_single of inputs[0]
    zeros = np.zeros_like(speaking)
    paths: list[Path | None] = [inputs[0], inputs[0]]
    paths[silent] = None
    speech = load_speech(paths, audio_type)
    given = [speaking, speaking]
    given[silent] = zeros
    if audio_type == "add":
        expected = [np.concatenate([given[0], zeros]), np.concatenate([zeros, given[1]])]
    else:
        expected = given
    for track, want in zip(speech.tracks, expected, strict=True):
        assert track.shape == want.shape
        assert np.abs(track - want).max() <= 1e-6 * np.abs(speaking).max()
    assert not speech.tracks[silent].any()
    assert speech.duration_s == pytest.approx(1.5 * (2 if audio_type == "add" else 1), abs=1e-3)
    for bad in ([None], [None, None]):
        with pytest.raises(ValueError, match="silent"):
            load_speech(bad, audio_type)
