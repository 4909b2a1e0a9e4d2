"""End-to-end renders with the tiny model on the CPU: every mode, the output file, resume."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from daemon.jobs import load_job
from pipeline import InfiniteTalkPipeline, StopRequested, checkpoint, media
from pipeline.types import Progress
from tests.helpers.media import make_job_bundle, make_wav, read_frames

FPS = 25


@pytest.fixture(scope="module")
def pipe(tiny_weights_dir: Path) -> InfiniteTalkPipeline:
    return InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cpu", dtype=torch.float32)


def _request(bundle: Path):
    return load_job(bundle / "job.json").to_request(bundle)


def _check_mp4(path: Path, *, frames: int, size: tuple[int, int]) -> None:
    """H.264 yuv420p 25 fps + AAC, `frames` frames, audio as long as the video, moov before mdat."""
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
        assert v.average_rate == FPS and (v.codec_context.height, v.codec_context.width) == size
        assert a.codec_context.name == "aac"
        n = sum(1 for _ in c.decode(video=0))
        c.seek(0)
        samples = sum(f.samples for f in c.decode(audio=0))
        rate = a.rate
    assert n == frames
    assert abs(samples / rate - frames / FPS) <= 1 / FPS + 2048 / rate
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def _audio_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return float(s.duration * s.time_base)


def test_multi_chunk_render_interrupted_and_resumed_is_identical(pipe, tmp_path: Path, monkeypatch) -> None:
    bundle = make_job_bundle(tmp_path / "job", kind="image", duration_s=1.64, seed=5, sample_steps=1)
    req = _request(bundle)
    events: list[Progress] = []
    calls = pipe.dit_calls
    handed: list[int] = []  # frames handed to the encoder per call: one chunk's new frames at a time
    encode = media.encode_segment
    monkeypatch.setattr(
        media,
        "encode_segment",
        lambda frames, path, **kw: (handed.append(len(frames)), encode(frames, path, **kw))[1],
    )
    full = pipe.generate(
        req,
        tmp_path / "full.mp4",
        poster_path=tmp_path / "full.jpg",
        on_progress=events.append,
        checkpoint_dir=tmp_path / "ck_full",
    )
    # 1.64 s -> 41 frames -> chunks at 0 and 24 (33-frame tiny chunks, 9 motion frames)
    assert full.num_frames == 41 and full.duration_s == pytest.approx(1.64)
    assert pipe.dit_calls - calls == 2 * 1 * 2  # 2 chunks x 1 step x 2 passes (text scale 1)
    assert {(e.chunk, e.num_chunks) for e in events if e.stage == "denoise"} == {(1, 2), (2, 2)}
    assert events[-1].stage == "done" and events[-1].frames_done == 41
    assert handed == [33, 8]  # chunk 0: 33 frames; chunk 1: its 24 new frames, cut at the audio's end
    _check_mp4(full.video_path, frames=41, size=(full.height, full.width))
    assert abs(full.duration_s - _audio_seconds(bundle / "voice.WAV")) < 1 / FPS
    assert (tmp_path / "full.jpg").read_bytes()[:2] == b"\xff\xd8"

    def stop_in_chunk_2(p: Progress) -> None:
        if p.chunk == 2 and p.stage == "prepare":
            raise StopRequested("test stop")

    ck = tmp_path / "ck_resume"
    with pytest.raises(StopRequested):
        pipe.generate(req, tmp_path / "resumed.mp4", on_progress=stop_in_chunk_2, checkpoint_dir=ck)
    state = json.loads((ck / checkpoint.STATE_FILE).read_text())
    assert (
        state["next_chunk"] == 1 and state["frames_written"] == 33 and state["segments"] == ["seg_00000.mp4"]
    )
    assert not (tmp_path / "resumed.mp4").exists()
    resumed = pipe.generate(req, tmp_path / "resumed.mp4", checkpoint_dir=ck)
    assert resumed.resumed_from_chunk == 1
    np.testing.assert_array_equal(read_frames(resumed.video_path), read_frames(full.video_path))


def test_should_stop_between_steps(pipe, tmp_path: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "job", kind="image", duration_s=1.4, seed=1, sample_steps=3, mode="clip"
    )
    seen: list[int] = []

    def should_stop() -> bool:
        seen.append(1)
        return len(seen) == 2

    with pytest.raises(StopRequested, match="step 2"):
        pipe.generate(_request(bundle), tmp_path / "x.mp4", should_stop=should_stop)
    assert not (tmp_path / "x.mp4").exists()


def test_clip_mode_and_one_pass_guidance(pipe, tmp_path: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "job",
        kind="image",
        duration_s=2.0,
        seed=2,
        sample_steps=2,
        mode="clip",
        sample_text_guide_scale=1.0,
        sample_audio_guide_scale=1.0,
    )
    calls = pipe.dit_calls
    res = pipe.generate(_request(bundle), tmp_path / "clip.mp4")
    assert pipe.dit_calls - calls == 2  # both scales 1: one DiT pass per step
    assert res.num_frames == 33  # one chunk
    _check_mp4(res.video_path, frames=33, size=(res.height, res.width))


def test_max_frame_num_caps_video_and_audio(pipe, tmp_path: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "job",
        kind="image",
        duration_s=2.0,
        seed=3,
        sample_steps=1,
        max_frame_num=20,
        sample_text_guide_scale=3.0,
        sample_audio_guide_scale=2.0,
    )
    calls = pipe.dit_calls
    res = pipe.generate(_request(bundle), tmp_path / "capped.mp4")
    assert pipe.dit_calls - calls == 3  # text scale 3, audio scale 2: three passes
    assert res.num_frames == 20 and res.duration_s == pytest.approx(0.8)
    _check_mp4(res.video_path, frames=20, size=(res.height, res.width))


@pytest.mark.parametrize("kind", ["two_para", "two_add"])
def test_two_speakers(pipe, tmp_path: Path, kind: str) -> None:
    settings = {"bbox": {"person1": [0, 0, 61, 48], "person2": [0, 48, 61, 97]}} if kind == "two_para" else {}
    duration = 1.5 if kind == "two_para" else 0.8
    bundle = make_job_bundle(
        tmp_path / "job", kind=kind, duration_s=duration, seed=4, sample_steps=1, **settings
    )
    res = pipe.generate(_request(bundle), tmp_path / f"{kind}.mp4")
    assert pipe.variant == "multi"
    expected = duration if kind == "two_para" else duration * 1.75  # add: person 1 then person 2
    assert res.num_frames == int(expected * FPS)
    _check_mp4(res.video_path, frames=res.num_frames, size=(res.height, res.width))


@pytest.mark.parametrize(("silent", "audio_type"), [("person2", "add"), ("person1", "para")])
def test_a_silent_speaker(pipe, tmp_path: Path, silent: str, audio_type: str) -> None:
    """The reference's `"None"` speaker renders: `add` doubles the length with silence after (or
    before) the speech, `para` keeps it; the output's audio is silent where the speaker is."""
    duration = 0.8 if audio_type == "add" else 1.5
    bundle = make_job_bundle(tmp_path / "job", kind="two_add", duration_s=duration, seed=4, sample_steps=1)
    doc = json.loads((bundle / "job.json").read_text())
    doc["cond_audio"] = {"person1": "man.wav", "person2": "man.wav", silent: "None"}
    doc["audio_type"] = audio_type
    (bundle / "job.json").write_text(json.dumps(doc))
    req = _request(bundle)
    assert None in req.audio
    res = pipe.generate(req, tmp_path / "silent.mp4")
    expected = duration * (2 if audio_type == "add" else 1)
    assert res.num_frames == int(expected * FPS)
    _check_mp4(res.video_path, frames=res.num_frames, size=(res.height, res.width))
    with av.open(str(res.video_path)) as c:
        pcm = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])
    half = pcm.shape[0] // 2
    if audio_type == "add":  # person 2 silent: speech, then silence
        assert np.abs(pcm[: half - 2048]).max() > 0.05 and np.abs(pcm[half + 2048 :]).max() < 1e-3
    else:
        assert np.abs(pcm).max() > 0.05


def test_video_dubbing_with_a_scene_cut(pipe, tmp_path: Path) -> None:
    bundle = make_job_bundle(
        tmp_path / "job",
        kind="video",
        duration_s=2.8,
        seed=6,
        sample_steps=1,
        sample_text_guide_scale=1.0,
        sample_audio_guide_scale=1.0,
    )
    req = _request(bundle)
    prepared = pipe.prepare(req, tmp_path / "work")
    # the source cuts at 1.4 s: two independent shots of 35 frames, each two tiny chunks
    assert [s.start for s in prepared.segments] == [0, 35]
    assert prepared.num_chunks == 4 and prepared.total_frames == 70
    pipe._use_variant("single")
    res = pipe.render(prepared, tmp_path / "dub.mp4", resume=False)
    assert res.num_frames == 70
    _check_mp4(res.video_path, frames=70, size=(res.height, res.width))


def test_dubbing_with_the_videos_own_sound(pipe, tmp_path: Path) -> None:
    """cond_video and cond_audio name the same MP4 (as the reference allows): its audio stream is
    the speech, its picture the reference frames; the output keeps that sound."""
    bundle = make_job_bundle(tmp_path / "job", kind="video", duration_s=1.6, seed=6, sample_steps=1)
    doc = json.loads((bundle / "job.json").read_text())
    doc["cond_audio"] = {"person1": doc["cond_video"]}
    (bundle / "job.json").write_text(json.dumps(doc))
    req = _request(bundle)
    assert req.audio == (req.cond_media,)
    res = pipe.generate(req, tmp_path / "own.mp4")
    assert res.num_frames == int(1.6 * FPS)
    _check_mp4(res.video_path, frames=res.num_frames, size=(res.height, res.width))


def test_invalid_inputs_name_the_file(pipe, tmp_path: Path) -> None:
    # speech shorter than a chunk renders (tests/pipeline/test_short_speech.py); bad files name the file
    req = _request(make_job_bundle(tmp_path / "bad", kind="image", duration_s=1.6, seed=1))
    (tmp_path / "bad" / "face.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="face.png"):
        pipe.generate(req, tmp_path / "y.mp4")
    make_wav(tmp_path / "bad" / "voice.WAV", duration_s=1.6)
    (tmp_path / "bad" / "voice.WAV").unlink()
    with pytest.raises(FileNotFoundError, match="voice.WAV"):
        pipe.generate(req, tmp_path / "z.mp4")


@pytest.mark.gpu
def test_tiny_render_on_cuda_in_bf16(tiny_weights_dir: Path, tmp_path: Path) -> None:
    """The GPU path (bf16 DiT/T5, fp16 CLIP, fp32 VAE) end to end, two speakers, three passes."""
    gpu = InfiniteTalkPipeline.from_weights(tiny_weights_dir, device="cuda", dtype=torch.bfloat16)
    bundle = make_job_bundle(
        tmp_path / "job", kind="two_para", duration_s=1.5, seed=8, sample_steps=2, sample_text_guide_scale=4.0
    )
    res = gpu.generate(_request(bundle), tmp_path / "gpu.mp4", checkpoint_dir=tmp_path / "ck")
    assert gpu.dit.dtype == torch.bfloat16 and res.num_frames == 37
    _check_mp4(res.video_path, frames=37, size=(res.height, res.width))


def test_no_forty_second_cap(pipe, tmp_path: Path) -> None:
    """42 s of speech gives 42 s of video: the reference stops at max_frame_num=1000 (40 s)."""
    bundle = make_job_bundle(tmp_path / "job", kind="image", duration_s=42.0, seed=6, sample_steps=1)
    res = pipe.generate(_request(bundle), tmp_path / "long.mp4")
    assert res.num_frames == 42 * FPS > 1000
    _check_mp4(res.video_path, frames=42 * FPS, size=(res.height, res.width))
    assert _audio_seconds(res.video_path) == pytest.approx(42.0, abs=1 / FPS)
