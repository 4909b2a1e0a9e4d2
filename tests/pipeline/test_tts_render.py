"""A text-to-speech job rendered end to end on the tiny model (CPU): the reference's job format,
voiced in the prepare stage into the job's folder, muxed into the MP4 at 24 kHz. The tiny
weights folder gets its tiny Kokoro-82M on the first such job (the daemon's tiny fallback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from daemon.jobs import TTS_FOLDER, load_job
from pipeline import InfiniteTalkPipeline
from pipeline.tts import voice
from pipeline.tts_text import KOKORO_DIR
from tests.helpers.media import make_rgba_png, make_two_person_image


@pytest.fixture(scope="module")
def tts_pipe(tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> InfiniteTalkPipeline:
    weights = tmp_path_factory.mktemp("tts-weights") / "w"
    shutil.copytree(tiny_weights_dir, weights)  # the shared tiny folder stays without Kokoro
    return InfiniteTalkPipeline.from_weights(weights, device="cpu", dtype=torch.float32, lora=None)


def _job(tmp_path: Path, image: Path, tts: dict) -> Path:
    """The reference's TTS job as its app.py writes it: cond_audio empty, voices as paths."""
    doc = {"prompt": "A person talks.", "cond_video": image.name, "cond_audio": {}, "tts_audio": tts}
    (tmp_path / "job.json").write_text(json.dumps(doc))
    return tmp_path / "job.json"


def _audio_stream(mp4: Path) -> tuple[int, float]:
    with av.open(str(mp4)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, samples / stream.rate


def test_a_tts_job_renders_with_its_voiced_speech_at_24k(
    tts_pipe: InfiniteTalkPipeline, tmp_path: Path
) -> None:
    assert not (tts_pipe.weights_dir / KOKORO_DIR).exists()
    tts = {"text": "Hello, this is a test.", "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}
    spec = load_job(_job(tmp_path, make_rgba_png(tmp_path / "ref_image.png"), tts))
    request = spec.to_request(tmp_path)
    result = tts_pipe.generate(request, tmp_path / "out.mp4")

    assert (tts_pipe.weights_dir / KOKORO_DIR / "voices" / "af_heart.pt").is_file()  # written on first use
    kept = request.audio[0]
    assert kept is not None and kept.parent.parent == tmp_path / TTS_FOLDER
    speech, rate = sf.read(kept, dtype="float32")
    assert rate == 24000
    np.testing.assert_array_equal(speech, voice(request.tts, tts_pipe.weights_dir, seed=spec.seed).tracks[0])
    mp4_rate, mp4_s = _audio_stream(tmp_path / "out.mp4")
    assert mp4_rate == 24000  # the voiced speech at its own rate, not the 16 kHz copy the model hears
    assert abs(mp4_s - min(speech.shape[0] / 24000, result.duration_s)) < 0.1
    assert "tts_s" in result.timings_s


def test_a_two_speaker_tts_job_renders(tts_pipe: InfiniteTalkPipeline, tmp_path: Path) -> None:
    tts = {
        "text": "(s1) Hi there.\n(s2) Hello!",
        "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
        "human2_voice": "weights/Kokoro-82M/voices/am_michael.pt",
    }
    spec = load_job(_job(tmp_path, make_two_person_image(tmp_path / "ref_img.png"), tts))
    request = spec.to_request(tmp_path)
    result = tts_pipe.generate(request, tmp_path / "out.mp4")
    one, _ = sf.read(request.audio[0], dtype="float32")
    two, _ = sf.read(request.audio[1], dtype="float32")
    assert one.shape == two.shape
    assert _audio_stream(tmp_path / "out.mp4")[0] == 24000 and result.num_frames > 0
