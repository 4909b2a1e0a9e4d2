"""Write the bundled example job: `python examples/make_example.py inbox/example` (or `--demo`).

Everything is made here in code, so nothing binary lives in the repository: an RGBA PNG of odd
size (a cut-out portrait: a soft face shape on a transparent background) and a 44.1 kHz stereo
16-bit `.WAV` of speech-like sound (voiced syllables with a gliding pitch and pauses), a few
seconds long, plus `job.json` in the reference model's format. The folder is written under a
dot-name and renamed into place, as any upload should be.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import wave
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 161, 203  # odd on purpose: the pipeline resizes and crops to its buckets
RATE = 44100
PROMPT = "A person is talking to the camera in a bright studio, soft light, natural expression."


def portrait(width: int = WIDTH, height: int = HEIGHT, seed: int = 7) -> Image.Image:
    """RGBA: a warm face oval with eyes and mouth, shoulders, a transparent surround."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.zeros((height, width, 3), np.float32)
    rgb[...] = (70 + 30 * yy / height)[..., None] * np.array([0.8, 0.9, 1.1], np.float32)
    cx, cy, rx, ry = width / 2, height * 0.4, width * 0.27, height * 0.25
    face = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    shoulders = ((xx - cx) / (width * 0.5)) ** 2 + ((yy - height * 1.05) / (height * 0.35)) ** 2
    rgb[face <= 1] = (224, 178, 150)
    rgb[shoulders <= 1] = (60, 80, 140)
    for ex in (cx - rx * 0.4, cx + rx * 0.4):
        eye = ((xx - ex) / (rx * 0.13)) ** 2 + ((yy - (cy - ry * 0.15)) / (ry * 0.08)) ** 2
        rgb[eye <= 1] = (40, 30, 30)
    mouth = ((xx - cx) / (rx * 0.35)) ** 2 + ((yy - (cy + ry * 0.45)) / (ry * 0.07)) ** 2
    rgb[mouth <= 1] = (150, 60, 60)
    rgb += rng.normal(0, 3, rgb.shape)
    alpha = np.where((face <= 1.15) | (shoulders <= 1.0), 255, 0).astype(np.float32)
    pixels = np.concatenate([np.clip(rgb, 0, 255), alpha[..., None]], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGBA")


def speech_like(duration_s: float = 4.0, rate: int = RATE, seed: int = 7) -> np.ndarray:
    """Float32 [N, 2]: syllables (0.15-0.3 s) of harmonics over a gliding pitch, with pauses."""
    rng = np.random.default_rng(seed)
    n = int(duration_s * rate)
    out = np.zeros(n, np.float32)
    t = 0.1
    while t < duration_s - 0.3:
        length = rng.uniform(0.15, 0.3)
        start, stop = int(t * rate), int(min(duration_s, t + length) * rate)
        k = np.arange(stop - start) / rate
        pitch = rng.uniform(110, 190) * (1 + 0.15 * np.sin(2 * np.pi * 2.5 * k))
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        voice = sum(np.sin(h * phase) / h for h in range(1, 7))
        envelope = np.sin(np.pi * np.arange(stop - start) / (stop - start)) ** 2
        out[start:stop] += 0.25 * voice * envelope
        t += length + rng.uniform(0.05, 0.25)
    out += rng.normal(0, 0.003, n).astype(np.float32)
    return np.stack([out, 0.9 * out], axis=1)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def make_example(target: Path, *, duration_s: float = 4.0) -> Path:
    """Write the example bundle at `target` (staged under a dot-name, then renamed)."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    portrait().save(staging / "portrait.png")
    write_wav(staging / "speech.WAV", speech_like(duration_s))
    job = {
        "prompt": PROMPT,
        "cond_video": "portrait.png",
        "cond_audio": {"person1": "speech.WAV"},
        "seed": 42,
    }
    (staging / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    os.rename(staging, target)
    return target


def demo_target(config: Path | None) -> Path | None:
    """`<inbox>/example` from the daemon's config, or None if the example is there or done already."""
    from daemon.config import load_settings

    settings = load_settings(config)
    target = settings.inbox / "example"
    if target.exists() or any(settings.outbox.glob("example*.mp4")):
        return None
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, nargs="?", help="bundle folder to create, e.g. inbox/example")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="write <inbox>/example of the daemon's config unless it was rendered already",
    )
    parser.add_argument("--config", type=Path, default=None, help="daemon config file (with --demo)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of speech")
    args = parser.parse_args()
    if args.demo:
        target = demo_target(args.config)
        if target is None:
            print("example job already in the inbox or rendered; not writing it again")
            return
    elif args.target is None:
        raise SystemExit("give a target folder, or --demo")
    else:
        target = args.target
        if target.exists():
            raise SystemExit(f"{target} exists already")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"example job written to {make_example(target, duration_s=args.duration)}")


if __name__ == "__main__":
    main()
