"""pipeline/media.py: reading references, scene cuts, the audio mix, segments -> faststart MP4."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline import media
from pipeline.audio import read_audio
from tests.helpers.media import LATIN1_TAG, add_wav_tags, make_audio, make_mp4, make_rgba_png, make_wav


def test_rgba_image_becomes_rgb(tmp_path: Path) -> None:
    path = make_rgba_png(tmp_path / "face.PNG")
    img = media.read_reference(path)
    assert img.mode == "RGB" and img.size == (97, 61)
    raw = np.asarray(Image.open(path))[..., :3]
    np.testing.assert_array_equal(np.asarray(img), raw)  # alpha dropped, colours kept (PIL convert)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(media.MediaError, match="bad.png"):
        media.read_reference(tmp_path / "bad.png")


def test_frame_reader_by_index_and_scene_cuts(tmp_path: Path) -> None:
    cut = make_mp4(tmp_path / "cut.mp4", duration_s=2.0, scene_cut_s=1.2)
    info = media.probe_video(cut)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 48, 25.0, 50)
    assert media.detect_scene_cuts(cut) == [30]
    assert media.detect_scene_cuts(make_mp4(tmp_path / "one.mp4", duration_s=2.0)) == []
    with media.FrameReader(cut) as reader:
        f29, f30 = np.asarray(reader.get(29), np.float32), np.asarray(reader.get(30), np.float32)
        assert np.abs(f29 - f30).mean() > 40  # the cut
        last = np.asarray(reader.get(49))
        np.testing.assert_array_equal(np.asarray(reader.get(500)), last)  # past the end: the last frame
        np.testing.assert_array_equal(np.asarray(reader.get(29)), f29.astype(np.uint8))  # backwards reopens


def test_mix_para_and_add(tmp_path: Path) -> None:
    a = make_wav(tmp_path / "a.WAV", duration_s=1.0, rate=44100, channels=2, seed=1)
    b = make_wav(tmp_path / "b.wav", duration_s=0.5, rate=22050, channels=1, seed=2)
    rate, n = media.mix_original_audio([a, b], "add", tmp_path / "add.wav")
    assert rate == 44100 and abs(n - 1.5 * 44100) < 200
    rate, n = media.mix_original_audio([a, b], "para", tmp_path / "para.wav")
    assert rate == 44100 and abs(n - 44100) < 200
    data, sr = sf.read(tmp_path / "para.wav")
    assert data.shape[1] == 2 and np.abs(data).max() <= 1.0 + 1e-6
    one, _ = sf.read(tmp_path / "add.wav")
    mono_a, _ = sf.read(a)
    np.testing.assert_allclose(one[:44100], mono_a, atol=1e-4)  # person 1 first, unchanged
    ogg = make_audio(tmp_path / "c.ogg", duration_s=0.5)
    assert media.mix_original_audio([ogg], "para", tmp_path / "o.wav")[0] == 48000
    assert not list(tmp_path.glob("*.part*.wav"))


def test_segments_join_into_a_faststart_mp4(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    segs = []
    for k, n in enumerate((20, 12)):
        frames = rng.integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)
        media.encode_segment(frames, tmp_path / f"s{k}.mp4")
        segs.append(tmp_path / f"s{k}.mp4")
    wav = make_wav(tmp_path / "v.wav", duration_s=1.5)
    media.assemble_mp4(segs, tmp_path / "out.mp4", num_frames=30, audio_wav=wav)  # cut 32 -> 30 frames
    with av.open(str(tmp_path / "out.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt, v.average_rate) == ("h264", "yuv420p", 25)
        assert a.codec_context.name == "aac" and a.rate == 44100
        pts = [f.pts * f.time_base for f in c.decode(video=0)]
        c.seek(0)
        samples = sum(f.samples for f in c.decode(audio=0))
    assert len(pts) == 30 and float(pts[-1]) == pytest.approx(29 / 25)
    assert abs(samples / 44100 - 30 / 25) < 2048 / 44100  # audio cut to the video (1.5 s -> 1.2 s)
    data = (tmp_path / "out.mp4").read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    assert not (tmp_path / "out.assemble.mp4").exists()


def test_check_decodable(tmp_path: Path) -> None:
    wav = make_wav(tmp_path / "ok.wav", duration_s=0.7)
    assert media.check_decodable(wav) == pytest.approx(0.7, abs=0.05)
    truncated = tmp_path / "cut.mp3"
    truncated.write_bytes(b"ID3" + b"\x00" * 50)
    with pytest.raises(media.MediaError, match="cut.mp3"):
        media.check_decodable(truncated)


def test_helper_bundles_are_valid_jobs_with_decodable_media(tmp_path: Path) -> None:
    from daemon.jobs import load_job
    from tests.helpers.media import JOB_KINDS, make_job_bundle, make_loose_job

    for kind in JOB_KINDS:
        bundle = make_job_bundle(tmp_path / kind, kind=kind, duration_s=1.0, seed=3)
        spec = load_job(bundle / "job.json")
        assert spec.seed == 3 and spec.num_speakers == (2 if kind.startswith("two") else 1)
        for rel in spec.media_files:
            media.check_decodable(bundle / rel)
    loose = make_loose_job(tmp_path / "inbox", "hello", kind="image", duration_s=1.0)
    spec = load_job(loose)
    assert spec.media_files == ("hello-face.png", "hello-voice.WAV")


def test_media_whose_tags_are_not_utf8_read_like_any_other(tmp_path: Path) -> None:
    """Every reader of the pipeline opens a WAV and an MP4 whose title tag is Latin-1 (PyAV < 19
    raised UnicodeDecodeError at open for such files; 19 refuses the option that avoided it)."""
    wav = add_wav_tags(make_wav(tmp_path / "voice.WAV", duration_s=1.0, rate=44100, channels=2))
    mp4 = make_mp4(tmp_path / "clip.mp4", duration_s=1.0, title=LATIN1_TAG)
    assert LATIN1_TAG in wav.read_bytes() and LATIN1_TAG in mp4.read_bytes()
    for path in (wav, mp4):
        assert abs(read_audio(path).size - 16000) < 400
        assert abs(media.check_decodable(path) - 1.0) < 0.1
        assert media.audio_rate(path) == 44100
        assert media.mix_original_audio([path], "para", tmp_path / f"{path.stem}.mix.wav")[0] == 44100
    assert media.probe_video(mp4).num_frames == 25
    assert media.detect_scene_cuts(mp4) == []
    with media.FrameReader(mp4) as reader:
        assert reader.get(3).size == (64, 48)
