"""Text-to-speech (pipeline/tts.py) on the tiny random Kokoro-82M: the product's speech is the
kokoro package's own output for the same files, text, voice and seed (it calls the library, it
does not reimplement it); two speakers take turns with silences that line up per speaker, as the
reference's `process_tts_multi`; a missing piece is `TtsUnavailable` naming what to get."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from daemon.policy import classify
from pipeline.tts import voice, voice_files
from pipeline.tts_text import (
    KOKORO_CONFIG,
    KOKORO_DIR,
    KOKORO_REPO,
    KOKORO_WEIGHTS,
    SAMPLE_RATE,
    TtsRequest,
    TtsUnavailable,
    voice_file,
)
from pipeline.tts_tiny import TINY_VOICES, write_tiny_kokoro


@pytest.fixture(scope="module")
def kokoro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kokoro")
    write_tiny_kokoro(out)
    return out


@pytest.fixture(scope="module")
def package_pipeline(kokoro_dir: Path):
    """The kokoro package set up as its README (and the reference) does, on the same files."""
    from kokoro import KModel, KPipeline

    folder = kokoro_dir / KOKORO_DIR
    model = KModel(
        repo_id=KOKORO_REPO, config=str(folder / KOKORO_CONFIG), model=str(folder / KOKORO_WEIGHTS)
    ).eval()
    return KPipeline(lang_code="a", repo_id=KOKORO_REPO, model=model)


def _package_say(pipe, text: str, voice_path: Path) -> torch.Tensor:
    pack = torch.load(voice_path, weights_only=True)
    return torch.cat([audio for _, _, audio in pipe(text, voice=pack, speed=1, split_pattern=r"\n+")])


def test_one_speaker_is_the_kokoro_package_output(kokoro_dir: Path, package_pipeline) -> None:
    text = "Hello there.\nHow are you?"
    got = voice(TtsRequest(text=text, voices=("af_heart",)), kokoro_dir, seed=7)
    torch.manual_seed(7)
    expected = _package_say(package_pipeline, text, voice_file(kokoro_dir, "af_heart")).numpy()
    assert got.sample_rate == SAMPLE_RATE == 24000
    assert len(got.tracks) == 1 and got.tracks[0].dtype == np.float32
    np.testing.assert_array_equal(got.tracks[0], expected)
    # the same seed voices the same speech again (a retry), another seed other noise
    again = voice(TtsRequest(text=text, voices=("af_heart",)), kokoro_dir, seed=7)
    np.testing.assert_array_equal(again.tracks[0], got.tracks[0])


def test_two_speakers_take_turns_and_the_silences_line_up(kokoro_dir: Path, package_pipeline) -> None:
    text = "(s1) Hello.\n(s2) Hi there! (s1) Bye."
    got = voice(TtsRequest(text=text, voices=TINY_VOICES), kokoro_dir, seed=3)
    # the reference's process_tts_multi: each turn voiced in order, the other speaker silent
    torch.manual_seed(3)
    turns = [(0, "Hello."), (1, "Hi there!"), (0, "Bye.")]
    spoken = [
        _package_say(package_pipeline, said, voice_file(kokoro_dir, TINY_VOICES[who])) for who, said in turns
    ]
    one, two = got.tracks
    assert one.shape == two.shape == (sum(s.shape[0] for s in spoken),)
    at = 0
    for (who, _), speech in zip(turns, spoken, strict=True):
        n = speech.shape[0]
        talking, silent = (one, two) if who == 0 else (two, one)
        np.testing.assert_array_equal(talking[at : at + n], speech.numpy())
        assert not silent[at : at + n].any(), f"the other speaker is silent during turn {at}"
        assert np.abs(talking[at : at + n]).max() > 0
        at += n


def test_voice_files_writes_24k_tracks_once(kokoro_dir: Path, tmp_path: Path) -> None:
    paths = (tmp_path / ".tts" / "person1.wav",)
    request = TtsRequest(text="Good morning.", voices=("am_michael",), speed=1.5)
    assert voice_files(request, kokoro_dir, paths, seed=1)
    data, rate = sf.read(paths[0], dtype="float32")
    assert rate == 24000 and data.ndim == 1 and data.shape[0] > 0
    np.testing.assert_array_equal(data, voice(request, kokoro_dir, seed=1).tracks[0])
    assert not voice_files(request, kokoro_dir, paths, seed=2)  # kept: a retry voices nothing new
    slow = voice(TtsRequest(text="Good morning.", voices=("am_michael",), speed=0.75), kokoro_dir, seed=1)
    assert slow.tracks[0].shape[0] > data.shape[0]  # speed reaches the model


def test_missing_model_or_voice_names_what_to_get(kokoro_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TtsUnavailable, match="infinitetalk weights download") as e:
        voice(TtsRequest(text="Hi.", voices=("af_heart",)), tmp_path, seed=0)
    assert classify(e.value).code == "tts_unavailable" and not classify(e.value).transient
    partial = tmp_path / "partial"
    shutil.copytree(kokoro_dir / KOKORO_DIR, partial / KOKORO_DIR)
    (partial / KOKORO_DIR / KOKORO_WEIGHTS).unlink()
    with pytest.raises(TtsUnavailable, match=KOKORO_WEIGHTS):
        voice(TtsRequest(text="Hi.", voices=("af_heart",)), partial, seed=0)
    with pytest.raises(ValueError, match=r"tts_audio.human2_voice: unknown voice 'bf_nobody'.*af_heart"):
        voice(TtsRequest(text="(s1) Hi. (s2) Yo.", voices=("af_heart", "bf_nobody")), kokoro_dir, seed=0)


def test_weights_check_covers_kokoro_as_optional(kokoro_dir: Path, tmp_path: Path) -> None:
    from pipeline.download import download_plan
    from pipeline.tts_check import check_kokoro

    assert [(f.status, f.path) for f in check_kokoro(tmp_path)] == [("note", "Kokoro-82M/")]
    found = check_kokoro(kokoro_dir)
    assert [f.status for f in found] == ["ok", "ok", "ok"], found
    assert "2 voices: af_heart, am_michael" in found[2].detail and "5 modules" in found[1].detail
    broken = tmp_path / "broken"
    shutil.copytree(kokoro_dir / KOKORO_DIR, broken / KOKORO_DIR)
    (broken / KOKORO_DIR / KOKORO_CONFIG).write_text('{"vocab": {}}')
    assert (
        check_kokoro(broken)[0].status == "wrong"
        and "missing keys: istftnet" in check_kokoro(broken)[0].detail
    )
    kokoro = download_plan()[-1]
    assert (kokoro.repo_id, kokoro.local_dir) == (KOKORO_REPO, KOKORO_DIR)
    assert set(kokoro.allow_patterns) == {"config.json", "kokoro-v1_0.pth", "voices/*.pt"}


def test_voicing_needs_no_network(kokoro_dir: Path) -> None:
    """English (a word outside misaki's lexicon goes to espeak-ng), Mandarin and Spanish, in a
    process whose every socket connect fails: all the G2P needs comes from installed packages."""
    code = f"""
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
from pathlib import Path
from pipeline.tts import voice
from pipeline.tts_text import TtsRequest
for lang, text in (("a", "Zorblax greets you."), ("z", "你好，世界。"), ("e", "Hola, amigo.")):
    got = voice(TtsRequest(text=text, voices=("af_heart",), lang_code=lang), Path({str(kokoro_dir)!r}), seed=0)
    assert got.tracks[0].shape[0] > 2400 and abs(got.tracks[0]).max() > 0, (lang, got.tracks[0].shape)
print("voiced offline")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "voiced offline" in proc.stdout, proc.stderr[-3000:]


def test_voiced_speech_is_resampled_not_loudness_normalised(kokoro_dir: Path, tmp_path: Path) -> None:
    """As the reference's TTS path: 24 kHz to 16 kHz only (speech files get -23 LUFS)."""
    from pipeline.audio import load_speech, read_audio

    path = tmp_path / "person1.wav"
    voice_files(TtsRequest(text="Good evening.", voices=("af_heart",)), kokoro_dir, (path,), seed=0)
    raw = read_audio(path, 16000)
    np.testing.assert_array_equal(load_speech([path], loudness=False).tracks[0], raw)
    assert not np.array_equal(load_speech([path]).tracks[0], raw)
