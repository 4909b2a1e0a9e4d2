"""Test media made in code: images, speech-like audio, short videos and whole job bundles.

Nothing here is copied from anywhere; every file is synthesised from a seed, so tests can make
the variety of real inputs (odd-sized RGBA PNGs, 44.1 kHz stereo `.WAV`, H.264+AAC MP4 with a
scene cut, a two-person picture) in milliseconds.
"""

from __future__ import annotations

import json
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.av_input import tags_are_loose


def _face_image(width: int, height: int, *, seed: int, faces: int = 1) -> np.ndarray:
    """An RGB picture [H, W, 3] uint8: a gradient background with one or two simple 'faces'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    img = np.stack(
        [base[0] + 40 * xx / width, base[1] + 40 * yy / height, base[2] - 30 * xx / width], axis=-1
    )
    for i in range(faces):
        cx = width * (i + 0.5) / faces
        cy = height * 0.45
        r = min(width / faces, height) * 0.3
        inside = ((xx - cx) / r) ** 2 + ((yy - cy) / (1.2 * r)) ** 2 <= 1.0
        skin = np.array([220, 180, 150], np.float32) - 25 * i
        img[inside] = skin
        for ex in (-0.35, 0.35):  # eyes
            eye = ((xx - cx - ex * r) ** 2 + (yy - cy + 0.25 * r) ** 2) <= (0.12 * r) ** 2
            img[eye] = (30, 30, 30)
        mouth = (np.abs(xx - cx) <= 0.4 * r) & (np.abs(yy - cy - 0.45 * r) <= 0.08 * r)
        img[mouth] = (150, 40, 50)
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_rgba_png(path: Path, *, width: int = 97, height: int = 61, seed: int = 0) -> Path:
    """An RGBA PNG of odd size whose alpha is not uniform (as users' cut-outs are)."""
    rgb = _face_image(width, height, seed=seed)
    alpha = np.full((height, width, 1), 255, np.uint8)
    alpha[:, : width // 8] = 96  # a half-transparent strip on the left
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(path)
    return Path(path)


def make_image(path: Path, *, width: int = 64, height: int = 48, seed: int = 0, faces: int = 1) -> Path:
    """An RGB image in the format of the path's extension (png, jpg, webp, bmp)."""
    Image.fromarray(_face_image(width, height, seed=seed, faces=faces), "RGB").save(path)
    return Path(path)


def make_two_person_image(path: Path, *, width: int = 96, height: int = 48, seed: int = 0) -> Path:
    """Two 'people' side by side: person1 on the left half, person2 on the right."""
    return make_image(path, width=width, height=height, seed=seed, faces=2)


def speech_like(duration_s: float, *, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Float32 [N, channels] in [-1, 1]: voiced bursts (harmonics of a gliding pitch, 4 syllables
    a second) separated by short pauses, plus a little noise, so loudness and features vary."""
    rng = np.random.default_rng(seed)
    n = round(duration_s * rate)
    t = np.arange(n) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllable = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    signal = 0.3 * voice * syllable + 0.01 * rng.normal(size=n)
    out = np.stack([signal * (1.0 - 0.2 * c) for c in range(channels)], axis=-1)
    return np.clip(out, -1, 1).astype(np.float32)


def make_wav(
    path: Path, *, duration_s: float = 4.0, rate: int = 44100, channels: int = 2, seed: int = 0
) -> Path:
    """A 16-bit PCM WAV (default 44.1 kHz stereo); name it `.WAV` to test upper-case extensions."""
    pcm = (speech_like(duration_s, rate=rate, channels=channels, seed=seed) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return Path(path)


#: a tag value that is Latin-1, not UTF-8 ("Café — ÿ"), as phones and old editors write them
LATIN1_TAG = "Caf\xe9 \x97 \xff".encode("latin-1")


def add_wav_tags(path: Path, title: bytes = LATIN1_TAG) -> Path:
    """Append a RIFF LIST/INFO chunk with `title` as its INAM (title) to the WAV at `path`."""
    data = Path(path).read_bytes()
    value = title + b"\x00" * (2 - len(title) % 2)  # NUL-terminated, padded to an even size
    info = b"INFO" + b"INAM" + len(value).to_bytes(4, "little") + value
    body = data[12:] + b"LIST" + len(info).to_bytes(4, "little") + info
    Path(path).write_bytes(b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WAVE" + body)
    return Path(path)


def make_audio(
    path: Path, *, duration_s: float = 4.0, rate: int = 44100, channels: int = 2, seed: int = 0
) -> Path:
    """Compressed audio (mp3, flac, m4a, ogg) through PyAV; `.wav` goes through `make_wav`."""
    import av

    suffix = Path(path).suffix.lower()
    if suffix == ".wav":
        return make_wav(path, duration_s=duration_s, rate=rate, channels=channels, seed=seed)
    codec = {".mp3": "libmp3lame", ".flac": "flac", ".m4a": "aac", ".ogg": "libopus"}[suffix]
    if codec == "libopus":
        rate = 48000
    samples = speech_like(duration_s, rate=rate, channels=channels, seed=seed)
    fmt = {".ogg": "ogg", ".m4a": "mp4"}.get(suffix)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo" if channels == 2 else "mono")
        _write_audio(container, stream, samples, rate)
    return Path(path)


def _write_audio(container: Any, stream: Any, samples: np.ndarray, rate: int) -> None:
    import av

    layout = "stereo" if samples.shape[1] == 2 else "mono"
    step = 1024
    for start in range(0, len(samples), step):
        block = np.ascontiguousarray(samples[start : start + step].T)  # [C, n] planar
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def make_mp4(
    path: Path,
    *,
    duration_s: float = 3.0,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    scene_cut_s: float | None = None,
    audio: bool = True,
    seed: int = 0,
    title: bytes | None = None,
) -> Path:
    """An H.264 (yuv420p) MP4 with AAC sound: a face that drifts a little each frame; with
    `scene_cut_s`, a different scene (other colours, other face) from that time on; with
    `title`, those bytes as its title tag (LATIN1_TAG: not UTF-8, as old tools write)."""
    import av

    frames = round(duration_s * fps)
    first = _face_image(width + 8, height + 8, seed=seed)
    scenes = [first, np.ascontiguousarray(255 - first[::-1])]  # the second shot: other colours, flipped
    raw_tags = {} if tags_are_loose() else {"metadata_errors": "surrogateescape"}  # title's raw bytes
    with av.open(str(path), "w", **raw_tags) as container:
        if title is not None:
            container.metadata["title"] = title.decode("utf-8", "surrogateescape")
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        astream = container.add_stream("aac", rate=44100, layout="stereo") if audio else None
        for i in range(frames):
            scene = scenes[1] if scene_cut_s is not None and i >= scene_cut_s * fps else scenes[0]
            dx = int(4 + 3 * np.sin(i / 6))
            dy = int(4 + 3 * np.cos(i / 9))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[dy : dy + height, dx : dx + width]))
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if astream is not None:
            _write_audio(
                container, astream, speech_like(duration_s, rate=44100, channels=2, seed=seed), 44100
            )
    return Path(path)


#: job kinds make_job_bundle knows
JOB_KINDS = ("image", "video", "two_para", "two_add")


def make_job_bundle(
    directory: Path,
    *,
    kind: str = "image",
    duration_s: float = 4.0,
    media_seed: int = 0,
    image_size: tuple[int, int] = (97, 61),
    job_json: bool = True,
    **settings: Any,
) -> Path:
    """Write a job bundle `directory/` (job.json + media, bare file names) and return the dir.

    kinds: "image" (RGBA PNG + 44.1 kHz stereo `.WAV`), "video" (MP4 as long as the audio, with
    a scene cut half-way, + WAV),
    "two_para" / "two_add" (two-person JPG + two WAVs; `add` tracks may differ in length).
    `settings` are added to job.json as given (e.g. sample_steps=2, seed=3, max_frame_num=20);
    `media_seed` varies the synthesised media.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = image_size
    doc: dict[str, Any] = {"prompt": f"A person is talking ({kind})."}
    if kind == "image":
        make_rgba_png(directory / "face.png", width=width, height=height, seed=media_seed)
        make_wav(directory / "voice.WAV", duration_s=duration_s, seed=media_seed)
        doc.update(cond_video="face.png", cond_audio={"person1": "voice.WAV"})
    elif kind == "video":
        make_mp4(
            directory / "talk.mp4",
            duration_s=duration_s,
            width=64,
            height=48,
            scene_cut_s=duration_s / 2,
            seed=media_seed,
        )
        make_wav(directory / "voice.WAV", duration_s=duration_s, seed=media_seed)
        doc.update(cond_video="talk.mp4", cond_audio={"person1": "voice.WAV"})
    elif kind in ("two_para", "two_add"):
        make_two_person_image(directory / "two.jpg", width=width, height=height, seed=media_seed)
        second = duration_s if kind == "two_para" else duration_s * 0.75
        make_wav(directory / "man.wav", duration_s=duration_s, seed=media_seed)
        make_wav(directory / "woman.wav", duration_s=second, rate=22050, channels=1, seed=media_seed + 1)
        doc.update(
            cond_video="two.jpg",
            cond_audio={"person1": "man.wav", "person2": "woman.wav"},
            audio_type="para" if kind == "two_para" else "add",
        )
    else:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {JOB_KINDS}")
    doc.update(settings)
    if job_json:
        (directory / "job.json").write_text(json.dumps(doc, indent=2))
    return directory


def make_loose_job(inbox: Path, name: str, *, kind: str = "image", **kwargs: Any) -> Path:
    """A loose job: `inbox/<name>.json` with its media beside it (names prefixed by `name`)."""
    staging = Path(inbox) / f".{name}.staging"
    make_job_bundle(staging, kind=kind, **kwargs)
    doc = json.loads((staging / "job.json").read_text())
    (staging / "job.json").unlink()

    def rename(rel: str) -> str:
        new = f"{name}-{rel}"
        (staging / rel).rename(Path(inbox) / new)
        return new

    doc["cond_video"] = rename(doc["cond_video"])
    doc["cond_audio"] = {p: rename(v) for p, v in doc["cond_audio"].items()}
    staging.rmdir()
    out = Path(inbox) / f"{name}.json"
    out.write_text(json.dumps(doc, indent=2))
    return out


def read_frames(video: Path) -> np.ndarray:
    """Every frame of `video` decoded to RGB: [frames, height, width, 3] uint8."""
    import av

    with av.open(str(video)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
