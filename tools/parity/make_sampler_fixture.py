"""Run the REFERENCE InfiniteTalk sampling loop on the CPU and store the latents of each chunk.

    python tools/parity/make_sampler_fixture.py [--ref /work/ref] [--out tests/fixtures/parity]

The reference's loop lives inside `InfiniteTalkPipeline.generate_infinitetalk`
(`wan/multitalk.py`): seeding, noise, mask and `y`, motion latents, timesteps and shift, the
guidance passes and their combination, the Euler update, motion re-insertion. This script calls
that method itself, in clip mode (one chunk) and in streaming mode (three chunks: each later one
is conditioned on the previous one's last decoded frames), on a reference `InfiniteTalkPipeline` object whose
DiT is the reference `WanModel` loaded with the project's tiny weights (seed 0), and whose VAE,
CLIP and T5 are the project's tiny encoders behind the reference's call interface (their own
parity is checked by the encoder fixtures). The speech features are the project's wav2vec2
features of the same test audio, saved as the `.pt` file the reference reads.
The decoded video is not compared: the latents handed to the VAE decoder are captured.

Shims for a CPU machine without the reference's extra packages (xfuser, xformers, diffusers,
flash-attn, decord, optimum-quanto, accelerate, torchvision's centre crop, ...) come from
`make_dit_fixtures.install_shims` plus the few modules `wan/multitalk.py` imports at its top
(`common.install_multitalk_shims`).

Media are made with tests/helpers/media.py from fixed seeds, so the test makes the same files.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.parity import common  # noqa: E402

#: the cases: name -> (steps, shift, text scale, audio scale)
CASES = {
    "sampler_3pass": (3, 7.0, 5.0, 4.0),
    "sampler_2pass": (2, 2.0, 1.0, 2.0),
    "sampler_stream": (2, 2.0, 1.0, 2.0),
    "sampler_apg_3pass": (3, 7.0, 5.0, 4.0),
    "sampler_apg_2pass": (3, 2.0, 1.0, 2.0),
    "sampler_multi": (2, 7.0, 5.0, 4.0),
    "sampler_stream_color": (2, 2.0, 1.0, 2.0),
    "sampler_stream_tail": (2, 2.0, 1.0, 2.0),
    "sampler_dub": (2, 2.0, 1.0, 2.0),
}
#: cases run with adaptive projected guidance (the reference's --use_apg, default momentum/threshold
#: except a low threshold, so the norm clamp is exercised on the tiny model's small velocities)
APG = {"sampler_apg_3pass": (-0.75, 55.0), "sampler_apg_2pass": (-0.5, 2.0)}
#: streaming cases: three chunks of the tiny model (33 frames, 9 motion frames: 33 + 2 x 24 = 81
#: frames); the third is the first whose noise comes after the reference's motion-noise draws
STREAMING = {"sampler_stream", "sampler_multi", "sampler_stream_color", "sampler_stream_tail", "sampler_dub"}
#: cases with colour correction on (strength 1, the reference CLI's default): the reference's
#: scikit-image Lab transfer corrects each chunk, and the corrected frames condition the next one
COLOR = {"sampler_stream_color", "sampler_dub"}
#: no frame cap (the reference CLI's max_frame_num 1000): 2.7 s of speech (67 frames) needs a third
#: chunk (48..81) whose audio runs past the end, where the reference pads by mirroring the last
#: frames; the video is then cut to the speech's length
TAIL = {"sampler_stream_tail", "sampler_dub"}
#: video dubbing: a 25 fps MP4 (no scene cut) instead of a photo; each chunk's reference frame is
#: the source frame at the chunk's start (the reference's `extract_specific_frames`), colour
#: correction on (against frame 0)
DUB = {"sampler_dub"}
TAIL_AUDIO_SECONDS = 2.7
STREAM_FRAMES = 81
STREAM_AUDIO_SECONDS = 3.6
#: two speakers (multi weights, region masks from bboxes), two streaming chunks (33 + 24 frames)
MULTI = {"sampler_multi"}
MULTI_FRAMES = 57
MULTI_AUDIO_SECONDS = 2.6
#: [row_min, col_min, row_max, col_max] in pixels of the 96 x 48 two-person image
MULTI_BBOX = ((0.0, 0.0, 48.0, 48.0), (4.0, 50.0, 44.0, 92.0))
SEED = 42
PROMPT = "A person is talking to the camera."
NEGATIVE = "blurry, static"
AUDIO_SECONDS = 1.6


def make_media(folder: Path, case: str = "sampler_3pass") -> tuple[Path, tuple[Path, ...]]:
    """The reference image and the speech (one file per speaker) both sides use (fixed seeds)."""
    from tests.helpers.media import make_mp4, make_rgba_png, make_two_person_image, make_wav

    if case in DUB:
        video = make_mp4(folder / "talk.mp4", duration_s=3.2, width=96, height=56, seed=11)
        return video, (make_wav(folder / "voice-dub.wav", duration_s=TAIL_AUDIO_SECONDS, seed=12),)

    if case in MULTI:
        image = make_two_person_image(folder / "two.png", seed=11)
        return image, tuple(
            make_wav(folder / f"voice{i + 1}-multi.wav", duration_s=MULTI_AUDIO_SECONDS, seed=12 + i)
            for i in range(2)
        )
    seconds = (
        TAIL_AUDIO_SECONDS if case in TAIL else STREAM_AUDIO_SECONDS if case in STREAMING else AUDIO_SECONDS
    )
    return make_rgba_png(folder / "face.png", seed=11), (
        make_wav(folder / f"voice-{seconds:g}s.WAV", duration_s=seconds, seed=12),
    )


def frames_for(case: str) -> int | None:
    """`max_frame_num` of a case (None: one chunk, clip mode)."""
    if case in MULTI:
        return MULTI_FRAMES
    if case in TAIL:
        return None
    return STREAM_FRAMES if case in STREAMING else None


def sampling(case: str) -> common.Sampling:
    steps, shift, text_scale, audio_scale = CASES[case]
    return common.Sampling(steps, shift, text_scale, audio_scale, SEED, PROMPT, NEGATIVE)


def request_for(image: Path, audio: tuple[Path, ...], case: str):  # noqa: ANN201
    return common.project_request(
        sampling(case),
        image,
        audio,
        bbox=MULTI_BBOX if case in MULTI else None,
        mode="streaming" if case in STREAMING else "clip",
        max_frame_num=frames_for(case),
        color_correction_strength=1.0 if case in COLOR else 0.0,
        use_apg=case in APG,
        apg_momentum=APG.get(case, (-0.75, 55.0))[0],
        apg_norm_threshold=APG.get(case, (-0.75, 55.0))[1],
    )


def main() -> None:
    args = common.fixture_args(__doc__)
    if importlib.util.find_spec("skimage") is None:
        raise SystemExit("scikit-image is needed for the colour-correction cases: pip install scikit-image")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # everything that uses transformers first: the shims below would confuse it
        weights, pipe = common.tiny_pipeline(tmp / "weights")
        inputs: dict[str, Path] = {}
        speakers: dict[str, dict[str, str]] = {}
        for case in CASES:
            image, audio = make_media(tmp, case)
            prepared = pipe.prepare(request_for(image, audio, case), tmp / "work" / case)
            speakers[case] = common.speaker_files(prepared, tmp, case)
            inputs[case] = image

        multitalk, dit_tool, model_mod = common.import_multitalk(args.ref, pipe)
        models = {}
        for variant in ("single", "multi"):
            models[variant] = dit_tool.build_reference(model_mod, pipe.config.dit)
            dit_tool.load_reference_weights(models[variant], weights, variant)
        ref, vae = common.reference_pipeline(multitalk, pipe, models["single"], NEGATIVE)
        frame_num = pipe.config.generation.frame_num
        for case, (steps, shift, text_scale, audio_scale) in CASES.items():
            vae.decoded.clear()
            ref.model = models["multi" if case in MULTI else "single"]
            job = {"prompt": PROMPT, "cond_video": str(inputs[case]), "cond_audio": speakers[case]}
            if case in MULTI:
                job["bbox"] = {f"person{i + 1}": list(box) for i, box in enumerate(MULTI_BBOX)}
            video = common.reference_render(
                ref.generate_infinitetalk,
                job,
                sampling(case),
                frame_num=frame_num,
                max_frames=1000 if case in TAIL else frames_for(case) or frame_num,
                color=1.0 if case in COLOR else 0.0,
                apg=APG.get(case),
            )
            meta = {
                "steps": str(steps),
                "shift": str(shift),
                "text_scale": str(text_scale),
                "audio_scale": str(audio_scale),
                "seed": str(SEED),
                "reference": str(args.ref),
                "video_frames": str(video.shape[1]),  # the reference's output [C, T, H, W]
            }
            tensors = {f"latents{i}": z.contiguous() for i, z in enumerate(vae.decoded)}
            if case not in STREAMING:
                tensors = {"latents": tensors.pop("latents0")}
            if case in DUB:
                # the source video itself: libx264's bytes for the same frames can differ from one
                # process to another, so the test renders exactly the file the reference saw
                tensors["source_mp4"] = torch.frombuffer(
                    bytearray(inputs[case].read_bytes()), dtype=torch.uint8
                )
            save_file(tensors, str(args.out / f"{case}.safetensors"), metadata=meta)
            for name, z in tensors.items():
                if z.is_floating_point():
                    print(f"{case} {name}: {tuple(z.shape)} |x| {z.abs().mean():.4f}")
            print(f"{case}: video of {video.shape[1]} frames")


if __name__ == "__main__":
    main()
