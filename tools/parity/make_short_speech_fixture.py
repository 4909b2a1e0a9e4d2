"""Run the REFERENCE sampling loop on speech shorter than one chunk and store what it renders.

    python tools/parity/make_short_speech_fixture.py [--ref /work/ref] [--out tests/fixtures/parity]

The reference's `generate_infinitetalk` (`wan/multitalk.py`) drops a speaker whose features have
`frame_num` rows or fewer (`if full_audio_emb.shape[0] <= frame_num: continue`) and then fails
its assertion "Aduio file not exists or length not satisfies frame nums.": as released, it does
NOT render speech of one chunk or less. Everything else in its loop handles such speech: the
first chunk's audio windows are clamped to the speech (`torch.clamp(center_indices, 0, T - 1)`),
the features are mirrored only after the first chunk, and the video is cut to the speech
(`gen_video_samples[:, :, :full_audio_emb.shape[0]]`). This script runs the reference's own
method with only that one gate removed (its source is compiled in memory with the two gate lines
left out; nothing else is changed and nothing is written into the checkout), in streaming mode
without a frame cap (the reference CLI's `max_frame_num` 1000), and stores the latents of its
first chunk (its second chunk is rendered and then cut away entirely) and the video's length.

Everything else (tiny weights, shims, the reference pipeline object, the project's tiny
encoders behind the reference's interface) is `make_sampler_fixture.py`'s (`common.py`).
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import textwrap
import types
from pathlib import Path

from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.parity import common  # noqa: E402

#: case -> seconds of speech (tiny model: 33 frames a chunk). 0.8 s = 20 frames; 1.33 s = 33
#: frames, exactly one chunk, where clamping (the reference's first chunk) and mirroring differ
CASES = {"sampler_short": 0.8, "sampler_short_33": 1.33}
STEPS, SHIFT, TEXT_SCALE, AUDIO_SCALE = 2, 2.0, 1.0, 2.0
SEED = 42
PROMPT = "A person is talking to the camera."
NEGATIVE = "blurry, static"
#: the gate, as it stands in the dedented method source
GATE = "        if full_audio_emb.shape[0] <= frame_num:\n            continue\n"


def make_media(folder: Path, case: str) -> tuple[Path, Path]:
    from tests.helpers.media import make_rgba_png, make_wav

    return make_rgba_png(folder / "face.png", seed=11), make_wav(
        folder / f"voice-{case}.wav", duration_s=CASES[case], seed=12
    )


#: every case's sampling settings
SAMPLING = common.Sampling(STEPS, SHIFT, TEXT_SCALE, AUDIO_SCALE, SEED, PROMPT, NEGATIVE)


def request_for(image: Path, audio: Path):  # noqa: ANN201
    fields = {"mode": "streaming", "max_frame_num": None, "color_correction_strength": 0.0}
    return common.project_request(SAMPLING, image, (audio,), **fields)


def ungated_generate(multitalk: types.ModuleType) -> types.FunctionType:
    """The reference's `generate_infinitetalk` with its short-speech gate (two lines) left out."""
    source = textwrap.dedent(inspect.getsource(multitalk.InfiniteTalkPipeline.generate_infinitetalk))
    if source.count(GATE) != 1:
        raise SystemExit(
            "the reference's short-speech gate was not found: has generate_infinitetalk changed?"
        )
    namespace = dict(vars(multitalk))
    exec(compile(source.replace(GATE, ""), multitalk.__file__, "exec"), namespace)  # noqa: S102
    return namespace["generate_infinitetalk"]


def main() -> None:
    args = common.fixture_args(__doc__)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        weights, pipe = common.tiny_pipeline(tmp / "weights")
        jobs = {}
        for case in CASES:
            image, audio = make_media(tmp, case)
            prepared = pipe.prepare(request_for(image, audio), tmp / "work" / case)
            jobs[case] = {
                "prompt": PROMPT,
                "cond_video": str(image),
                "cond_audio": common.speaker_files(prepared, tmp, case),
            }
            print(f"{case}: {prepared.segments[0].plan.audio_frames} frames of speech")

        multitalk, dit_tool, model_mod = common.import_multitalk(args.ref, pipe)
        model = dit_tool.build_reference(model_mod, pipe.config.dit)
        dit_tool.load_reference_weights(model, weights, "single")
        ref, vae = common.reference_pipeline(multitalk, pipe, model, NEGATIVE)
        generate = types.MethodType(ungated_generate(multitalk), ref)
        frame_num = pipe.config.generation.frame_num
        for case, job in jobs.items():
            vae.decoded.clear()
            video = common.reference_render(generate, job, SAMPLING, frame_num=frame_num, max_frames=1000)
            meta = {
                "seconds": str(CASES[case]),
                "steps": str(STEPS),
                "seed": str(SEED),
                "reference": str(args.ref),
                "reference_change": "short-speech gate removed (see tools/parity/make_short_speech_fixture.py)",
                "reference_chunks": str(len(vae.decoded)),
                "video_frames": str(video.shape[1]),
            }
            save_file(
                {"latents": vae.decoded[0].contiguous()}, str(args.out / f"{case}.safetensors"), metadata=meta
            )
            print(f"{case}: reference rendered {len(vae.decoded)} chunk(s), video of {video.shape[1]} frames")


if __name__ == "__main__":
    main()
