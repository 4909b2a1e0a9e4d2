"""Media in and out through PyAV: reference frames, the job's original audio, MP4 output.

Input
    `read_image` / `FrameReader` give the reference frame(s) as RGB PIL images (an RGBA image is
    converted with `.convert("RGB")`, as the reference does); `probe_video` and
    `detect_scene_cuts` look at a source video for dubbing; `check_decodable` decodes a file to
    the end and raises `MediaError` naming it when it cannot.

Output
    The video is written as one H.264 segment per chunk (`encode_segment`: yuv420p, 25 fps, no
    B-frames, so segments join without re-encoding), then `assemble_mp4` copies the segments'
    packets into the final MP4 with the job's original audio (mixed for two speakers by
    `mix_original_audio`, kept as a float WAV on disk) encoded to AAC, cut to the video's
    duration, with `movflags=faststart` (moov before mdat). Frames never accumulate in memory: a
    chunk is encoded as soon as it is decoded, and audio is streamed in blocks.

PyAV is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.av_input import open_input
from pipeline.types import FPS

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
AUDIO_BLOCK = 4096  # samples per AAC input block when streaming audio
DEFAULT_CRF = 18


class MediaError(ValueError):
    """A media file that cannot be used; `path` names it."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path.name}: {message}")


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# ---------------------------------------------------------------------------------------------
# reading


def read_image(path: Path) -> Image.Image:
    """An image file as RGB (alpha dropped the way PIL's convert does, as the reference)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError) as e:
        raise MediaError(path, f"cannot decode image ({e})") from e


@dataclass(frozen=True, slots=True, kw_only=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int


def probe_video(path: Path) -> VideoInfo:
    """Size, frame rate and frame count of a video (frames counted by decoding when needed)."""
    import av

    try:
        with open_input(path) as container:
            if not container.streams.video:
                raise MediaError(path, "has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or FPS)
            count = stream.frames or sum(1 for _ in container.decode(stream))
            return VideoInfo(width=stream.width, height=stream.height, fps=fps, num_frames=count)
    except av.error.FFmpegError as e:
        raise MediaError(path, f"cannot decode video ({e})") from e


class FrameReader:
    """Frames of a video by index, decoded forward once (indices must not decrease much: a lower
    index reopens the file). An index past the end gives the last frame, as the reference does."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._index = -1
        self._current: np.ndarray | None = None
        self._ended = False

    def _open(self) -> None:
        import av

        self.close()
        try:
            self._container = open_input(self.path)
            self._frames = self._container.decode(video=0)
        except av.error.FFmpegError as e:
            raise MediaError(self.path, f"cannot decode video ({e})") from e
        self._index, self._current, self._ended = -1, None, False

    def get(self, index: int) -> Image.Image:
        if self._frames is None or index < self._index:
            self._open()
        while self._index < index and not self._ended:
            try:
                frame = next(self._frames)  # type: ignore[arg-type]
            except StopIteration:
                self._ended = True
                break
            self._current = frame.to_ndarray(format="rgb24")
            self._index += 1
        if self._current is None:
            raise MediaError(self.path, "has no decodable video frames")
        return Image.fromarray(self._current)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._frames = None, None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_reference(path: Path, index: int = 0) -> Image.Image:
    """Frame `index` of a video (clamped to its last frame), or the image itself."""
    if not is_video(path):
        return read_image(path)
    with FrameReader(path) as reader:
        return reader.get(index)


def detect_scene_cuts(path: Path, *, threshold: float = 0.08, min_gap: int = 5) -> list[int]:
    """Source frame indices where a new shot starts (hard cuts), by the mean absolute difference
    of consecutive 64x36 RGB thumbnails (0..1); a cut needs a jump over `threshold` that is also
    at least 4x the median change (camera motion is not a cut), `min_gap` frames after the last."""
    import av

    diffs: list[float] = []
    previous: np.ndarray | None = None
    try:
        with open_input(path) as container:
            for frame in container.decode(video=0):
                thumb = (
                    frame.reformat(width=64, height=36, format="rgb24").to_ndarray().astype(np.float32) / 255
                )
                if previous is not None:
                    diffs.append(float(np.abs(thumb - previous).mean()))
                previous = thumb
    except av.error.FFmpegError as e:
        raise MediaError(path, f"cannot decode video ({e})") from e
    if not diffs:
        return []
    floor = 4.0 * float(np.median(diffs))
    cuts: list[int] = []
    for i, d in enumerate(diffs):
        if d > threshold and d > floor and (not cuts or i + 1 - cuts[-1] >= min_gap):
            cuts.append(i + 1)
    return cuts


def check_decodable(path: Path) -> float:
    """Decode every stream of a media file to the end; returns its duration in seconds (0 for
    a still image). Raises MediaError naming the file when it cannot be decoded."""
    import av

    path = Path(path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        read_image(path)
        return 0.0
    try:
        with open_input(path) as container:
            last = 0.0
            count = 0
            for frame in container.decode(*container.streams):
                count += 1
                if frame.time is not None:
                    last = max(
                        last,
                        float(frame.time)
                        + float(getattr(frame, "samples", 0) or 0)
                        / float(getattr(frame, "sample_rate", 0) or 1),
                    )
            if count == 0:
                raise MediaError(path, "holds no decodable audio or video")
            return last
    except av.error.FFmpegError as e:
        raise MediaError(path, f"cannot decode ({e})") from e


# ---------------------------------------------------------------------------------------------
# the job's original audio, for the output file


def _decode_audio(path: Path, rate: int) -> Iterator[np.ndarray]:
    """Blocks of float32 stereo [2, n] at `rate` (PyAV's resampler), streamed."""
    import av

    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
    try:
        with open_input(path) as container:
            if not container.streams.audio:
                raise MediaError(path, "has no audio stream")
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    yield out.to_ndarray()
            for out in resampler.resample(None):
                yield out.to_ndarray()
    except av.error.FFmpegError as e:
        raise MediaError(path, f"cannot decode audio ({e})") from e


def audio_rate(path: Path) -> int:
    import av

    try:
        with open_input(path) as container:
            if not container.streams.audio:
                raise MediaError(path, "has no audio stream")
            return int(container.streams.audio[0].rate)
    except av.error.FFmpegError as e:
        raise MediaError(path, f"cannot decode audio ({e})") from e


def mix_original_audio(paths: Sequence[Path | None], audio_type: str, out_wav: Path) -> tuple[int, int]:
    """Write the output's audio track to `out_wav` (float32 stereo): the single track, or two
    speakers mixed as the job says (`para`: played together, summed, scaled down only if the sum
    would clip; `add`: person 1 then person 2). Returns (sample rate, samples). The rate is the
    first track's when AAC supports it, else 48 kHz; other tracks are resampled to it. A `None`
    speaker (one of two) is silent for as long as the other speaks."""
    import soundfile as sf

    if all(p is None for p in paths):
        raise ValueError(f"at most one of two speakers can be silent (None), got {list(paths)}")
    if None in paths:
        return _mix_with_silent(paths, audio_type, Path(out_wav))
    speaking = [p for p in paths if p is not None]
    first = audio_rate(speaking[0])
    rate = first if first in AAC_RATES else 48000
    out_wav = Path(out_wav)
    if len(paths) == 1 or audio_type == "add":
        total = 0
        with sf.SoundFile(out_wav, "w", samplerate=rate, channels=2, subtype="FLOAT") as out:
            for path in speaking:
                for block in _decode_audio(path, rate):
                    out.write(block.T)
                    total += block.shape[1]
        return rate, total
    if audio_type != "para":
        raise ValueError(f"audio_type must be 'para' or 'add', got {audio_type!r}")
    # para: decode each to its own file, then sum block by block (constant memory)
    parts = [out_wav.with_name(f"{out_wav.stem}.part{i}.wav") for i in range(len(speaking))]
    lengths = []
    for path, part in zip(speaking, parts, strict=True):
        n = 0
        with sf.SoundFile(part, "w", samplerate=rate, channels=2, subtype="FLOAT") as out:
            for block in _decode_audio(path, rate):
                out.write(block.T)
                n += block.shape[1]
        lengths.append(n)
    total = max(lengths)
    peak = 0.0
    for block in _sum_blocks(parts, total):
        peak = max(peak, float(np.abs(block).max(initial=0.0)))
    gain = 1.0 / peak if peak > 1.0 else 1.0
    with sf.SoundFile(out_wav, "w", samplerate=rate, channels=2, subtype="FLOAT") as out:
        for block in _sum_blocks(parts, total):
            out.write(block * gain)
    for part in parts:
        part.unlink()
    return rate, total


def _mix_with_silent(paths: Sequence[Path | None], audio_type: str, out_wav: Path) -> tuple[int, int]:
    """Two speakers, one of them silent: `para` is the speaking track alone; `add` is that track
    with as long a silence before it (person 1 silent) or after it (person 2 silent)."""
    import soundfile as sf

    if audio_type not in ("para", "add"):
        raise ValueError(f"audio_type must be 'para' or 'add', got {audio_type!r}")
    speaking = next(p for p in paths if p is not None)
    if audio_type == "para":
        return mix_original_audio([speaking], audio_type, out_wav)
    part = out_wav.with_name(f"{out_wav.stem}.speaking.wav")
    rate, n = mix_original_audio([speaking], audio_type, part)
    silence_first = paths[0] is None
    with sf.SoundFile(out_wav, "w", samplerate=rate, channels=2, subtype="FLOAT") as out:
        if silence_first:
            _write_silence(out, n)
        with sf.SoundFile(part) as src:
            for block in src.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
                out.write(block)
        if not silence_first:
            _write_silence(out, n)
    part.unlink()
    return rate, 2 * n


def _write_silence(out: Any, n: int, block: int = 1 << 16) -> None:
    for start in range(0, n, block):
        out.write(np.zeros((min(block, n - start), 2), np.float32))


def _sum_blocks(parts: Sequence[Path], total: int, block: int = 1 << 16) -> Iterator[np.ndarray]:
    import soundfile as sf

    files = [sf.SoundFile(p) for p in parts]
    try:
        for start in range(0, total, block):
            n = min(block, total - start)
            acc = np.zeros((n, 2), np.float32)
            for f in files:
                data = f.read(n, dtype="float32", always_2d=True)
                acc[: len(data)] += data
            yield acc
    finally:
        for f in files:
            f.close()


# ---------------------------------------------------------------------------------------------
# writing


def to_uint8_frames(video: Any) -> np.ndarray:
    """Decoded frames [3, T, H, W] in [-1, 1] (torch or numpy) -> uint8 [T, H, W, 3]."""
    x = video.detach().cpu().float().numpy() if hasattr(video, "detach") else np.asarray(video, np.float32)
    x = np.clip((x + 1.0) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def encode_segment(frames: np.ndarray, path: Path, *, fps: int = FPS, crf: int = DEFAULT_CRF) -> None:
    """Encode uint8 frames [T, H, W, 3] into a video-only MP4 segment (H.264 yuv420p, no
    B-frames, first frame a keyframe). Deterministic for the same frames."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {w}x{h}")
    tmp = Path(path).with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "bf": "0", "threads": "1"}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    tmp.replace(path)


def write_poster(frame: np.ndarray, path: Path, *, quality: int = 90) -> None:
    """One uint8 frame [H, W, 3] as a JPEG (written to a temp name, then renamed)."""
    tmp = Path(path).with_suffix(".tmp.jpg")
    Image.fromarray(frame).save(tmp, format="JPEG", quality=quality)
    tmp.replace(path)


def assemble_mp4(
    segments: Sequence[Path],
    out_path: Path,
    *,
    num_frames: int,
    audio_wav: Path | None,
    fps: int = FPS,
) -> None:
    """Join the segments' H.264 packets (no re-encode) and the audio (AAC, cut to num_frames/fps
    seconds) into `out_path`, faststart. Video and audio are interleaved segment by segment."""
    import av
    import soundfile as sf

    if not segments:
        raise ValueError("no video segments to assemble")
    tmp = Path(out_path).with_name(Path(out_path).stem + ".assemble.mp4")
    audio_file = sf.SoundFile(audio_wav) if audio_wav is not None else None
    try:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            with open_input(segments[0]) as first:
                vstream = out.add_stream_from_template(first.streams.video[0])
            vstream.time_base = Fraction(1, fps * 512)
            astream = None
            if audio_file is not None:
                astream = out.add_stream("aac", rate=audio_file.samplerate, layout="stereo")
                astream.bit_rate = 192_000
            audio_limit = 0 if audio_file is None else round(num_frames / fps * audio_file.samplerate)
            audio_done = 0
            frames_done = 0
            for seg in segments:
                with open_input(seg) as src:
                    sv = src.streams.video[0]
                    assert sv.time_base is not None, f"{seg} has a video stream without a time base"
                    offset = Fraction(frames_done, fps)
                    count = 0
                    for packet in src.demux(sv):
                        if packet.pts is None or frames_done + count >= num_frames:
                            continue
                        ts = offset + packet.pts * sv.time_base
                        packet.pts = packet.dts = round(ts / vstream.time_base)
                        packet.duration = round(Fraction(1, fps) / vstream.time_base)
                        packet.time_base = vstream.time_base
                        packet.stream = vstream
                        out.mux(packet)
                        count += 1
                    frames_done += count
                if astream is not None and audio_file is not None:
                    target = min(audio_limit, round(frames_done / fps * audio_file.samplerate))
                    audio_done = _mux_audio(out, astream, audio_file, audio_done, target)
            if astream is not None and audio_file is not None:
                _mux_audio(out, astream, audio_file, audio_done, audio_limit)
                for packet in astream.encode(None):
                    out.mux(packet)
        tmp.replace(out_path)
    finally:
        if audio_file is not None:
            audio_file.close()
        tmp.unlink(missing_ok=True)


def _mux_audio(out: Any, stream: Any, audio: Any, done: int, target: int) -> int:
    """Encode audio samples [done, target) (silence past the file's end) and mux them."""
    import av

    rate = audio.samplerate
    while done < target:
        n = min(AUDIO_BLOCK, target - done)
        block = audio.read(n, dtype="float32", always_2d=True)  # [n', 2]
        if len(block) < n:
            block = np.concatenate([block, np.zeros((n - len(block), block.shape[1]), np.float32)])
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block.T), format="fltp", layout="stereo")
        frame.sample_rate = rate
        frame.pts = done
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        done += n
    return done
