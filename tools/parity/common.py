"""What the fixture scripts share: their command line, loading one another, fake modules for what
the reference imports but a CPU machine lacks, and the reference's `InfiniteTalkPipeline` built
around the project's tiny models (for `make_sampler_fixture.py` and `make_short_speech_fixture.py`,
with the project's tiny pipeline, the speech features handed over as files, and one case's
sampling settings given to both sides alike).

Run by hand only (the reference checkout is not installed here); the scripts import it as
`tools.parity.common` once they have put the repository root on `sys.path`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def fixture_args(doc: str | None) -> argparse.Namespace:
    """`--ref` (the reference checkout) and `--out` (the fixtures folder), with `doc` as the help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", type=Path, default=Path("/work/ref"), help="MeiGen-AI/InfiniteTalk checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity")
    return parser.parse_args()


def load_tool(name: str) -> types.ModuleType:
    """Another fixture script, `tools/parity/<name>.py`, imported by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None, name
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def module(name: str, **attrs: object) -> types.ModuleType:
    """A fake module `name` with `attrs`, registered in `sys.modules`."""
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision.transforms.functional.center_crop for tensors no smaller than `size`."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
    return x[..., top : top + size[0], left : left + size[1]]


def _extract_specific_frames(path: str, index: int):  # noqa: ANN202
    """The reference's `wan.utils.utils.extract_specific_frames` (decord there, PyAV here, both
    FFmpeg): frame `index` of a video (the last one past its end), or the image itself."""
    from PIL import Image

    if Path(path).suffix.lower() not in (".mp4", ".mov", ".mkv", ".webm", ".avi"):
        return Image.open(path).convert("RGB")
    from pipeline.av_input import open_input

    with open_input(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return Image.fromarray(frames[min(index, len(frames) - 1)])


def install_multitalk_shims() -> None:
    """What `wan/multitalk.py` imports beyond the DiT's shims (installed by `import_reference`)."""
    dummy = type("Dummy", (), {})
    tv = sys.modules.get("torchvision") or module("torchvision")
    tv.transforms = module(
        "torchvision.transforms",
        functional=module("torchvision.transforms.functional", center_crop=_center_crop),
    )
    module("diffusers.models")
    module("diffusers.models.modeling_utils", no_init_weights=dummy, ContextManagers=dummy)
    module("accelerate")
    module("wan.distributed")
    module("wan.distributed.fsdp", shard_model=dummy)
    module("wan.modules.clip", CLIPModel=dummy)
    module("wan.modules.t5", T5EncoderModel=dummy, T5LayerNorm=dummy, T5RelativeEmbedding=dummy)
    module("wan.modules.vae", WanVAE=dummy, CausalConv3d=dummy, RMS_norm=dummy, Upsample=dummy)
    module("src")
    module(
        "src.vram_management",
        AutoWrappedQLinear=dummy,
        AutoWrappedLinear=dummy,
        AutoWrappedModule=dummy,
        enable_vram_management=dummy,
    )
    import inspect

    if not hasattr(inspect, "ArgSpec"):  # imported (unused) by wan/multitalk.py; gone in Python 3.11
        inspect.ArgSpec = dummy  # type: ignore[attr-defined]

    module(
        "wan.utils.utils",
        convert_video_to_h264=dummy,
        get_video_codec=lambda path: "h264",
        extract_specific_frames=_extract_specific_frames,
    )
    module("optimum")
    module("optimum.quanto", quantize=dummy, freeze=dummy, qint8=dummy, requantize=dummy)
    module("optimum.quanto.nn")
    module("optimum.quanto.nn.qlinear")


class RefVAE:
    """The project's VAE behind the reference's `WanVAE` list interface; records decode inputs."""

    def __init__(self, pipe) -> None:  # noqa: ANN001
        self.pipe = pipe
        self.decoded: list[torch.Tensor] = []

    def encode(self, videos):  # noqa: ANN001, ANN201
        out = []
        for v in videos:  # [3, F, H, W]
            out.append(self.pipe._encode_one_frame(v) if v.shape[1] == 1 else self.pipe.vae.encode(v))
        return out

    def decode(self, zs):  # noqa: ANN001, ANN201
        self.decoded.extend(z.clone() for z in zs)
        return [self.pipe.vae.decode(z) for z in zs]


class RefCLIP:
    def __init__(self, pipe) -> None:  # noqa: ANN001
        self.model = pipe.image_encoder.model
        self.encoder = pipe.image_encoder

    def visual(self, videos):  # noqa: ANN001, ANN201 - [1, 3, 1, H, W]
        return self.encoder.encode_image_clip(videos[:, :, 0])


class RefT5:
    def __init__(self, pipe) -> None:  # noqa: ANN001
        self.model = pipe.text_encoder.model
        self.encoder = pipe.text_encoder

    def __call__(self, prompts, device):  # noqa: ANN001, ANN204
        return [t.to(device) for t in self.encoder.encode_text(list(prompts))]


def import_multitalk(ref: Path, pipe: Any) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """The reference's `wan.multitalk` behind the DiT's shims and its own, with its aspect-ratio
    buckets set to `pipe`'s tiny ones: (wan.multitalk, make_dit_fixtures, the reference DiT module).
    Call it after everything that uses transformers: the shims would confuse it."""
    dit_tool = load_tool("make_dit_fixtures")
    model_mod, utils, _ = dit_tool.import_reference(ref)
    install_multitalk_shims()
    multitalk = importlib.import_module("wan.multitalk")
    multitalk.torch_gc = lambda: None
    tiny_480 = pipe.config.buckets["infinitetalk-480"]
    utils.ASPECT_RATIO_627 = {f"{h / w:.2f}": ([h, w], 1) for h, w in tiny_480}
    return multitalk, dit_tool, model_mod


#: what the reference pipeline's `__init__` would set, for one CPU process in float32
REFERENCE_SETTINGS: dict[str, Any] = {
    "device": torch.device("cpu"),
    "rank": 0,
    "t5_cpu": False,
    "param_dtype": torch.float32,
    "num_timesteps": 1000,
    "num_train_timesteps": 1000,
    "use_timestep_transform": True,
    "vae_stride": (4, 8, 8),
    "patch_size": (1, 2, 2),
    "sp_size": 1,
    "vram_management": False,
    "cpu_offload": False,
}


def reference_pipeline(
    multitalk: types.ModuleType, pipe: Any, model: torch.nn.Module, negative: str
) -> tuple[Any, RefVAE]:
    """The reference's `InfiniteTalkPipeline` (its `__init__`, which loads the released
    checkpoints, not run) with `REFERENCE_SETTINGS` around the reference DiT `model` and `pipe`'s
    tiny encoders; and its VAE, which records the latents it decodes."""
    ref = object.__new__(multitalk.InfiniteTalkPipeline)
    vae = RefVAE(pipe)
    ref.__dict__.update(REFERENCE_SETTINGS)
    ref.__dict__.update(
        sample_neg_prompt=negative, model=model, vae=vae, clip=RefCLIP(pipe), text_encoder=RefT5(pipe)
    )
    return ref, vae


@dataclass(frozen=True, slots=True)
class Sampling:
    """One case's sampling settings: the project's request and the reference's call both take them."""

    steps: int
    shift: float
    text_scale: float
    audio_scale: float
    seed: int
    prompt: str
    negative: str


def tiny_pipeline(folder: Path) -> tuple[Path, Any]:
    """Tiny weights (seed 0) written into `folder` and the project's CPU float32 pipeline on them."""
    from pipeline.pipeline import InfiniteTalkPipeline
    from pipeline.tiny import write_tiny_weights

    weights = write_tiny_weights(folder, seed=0)
    return weights, InfiniteTalkPipeline.from_weights(weights, device="cpu", dtype=torch.float32, lora=None)


def project_request(s: Sampling, image: Path, audio: tuple[Path, ...], **fields: Any) -> Any:
    """The project's `GenerationRequest` of a case; `fields`: what else the case sets."""
    from pipeline.types import GenerationRequest

    return GenerationRequest(
        prompt=s.prompt,
        negative_prompt=s.negative,
        cond_media=image,
        audio=tuple(audio),
        audio_type="para",
        size="infinitetalk-480",
        sample_steps=s.steps,
        sample_shift=s.shift,
        sample_text_guide_scale=s.text_scale,
        sample_audio_guide_scale=s.audio_scale,
        seed=s.seed,
        **fields,
    )


def speaker_files(prepared: Any, folder: Path, case: str) -> dict[str, str]:
    """Each speaker's features of `prepared`'s first segment (the chunk loop's rows), saved as the
    `.pt` file the reference reads: the job's `cond_audio` ({"person1": path, ...})."""
    seg = prepared.segments[0]
    speakers = {}
    for i, track in enumerate(seg.features):
        path = folder / f"person{i + 1}-{case}.pt"
        torch.save(track[: seg.plan.audio_frames].clone(), path)
        speakers[f"person{i + 1}"] = str(path)
    return speakers


def reference_render(
    generate: Any,
    job: dict[str, Any],
    s: Sampling,
    *,
    frame_num: int,
    max_frames: int,
    color: float = 0.0,
    apg: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The reference's `generate_infinitetalk` (`generate`, bound to its pipeline) on `job` with
    the case's settings: `apg` is (momentum, norm threshold) for a case with APG. Its video
    [C, T, H, W]."""
    momentum, threshold = apg or (0.0, 0.0)
    return generate(
        job,
        size_buckget="infinitetalk-480",
        motion_frame=9,
        frame_num=frame_num,
        shift=s.shift,
        sampling_steps=s.steps,
        text_guide_scale=s.text_scale,
        audio_guide_scale=s.audio_scale,
        n_prompt=s.negative,
        seed=s.seed,
        offload_model=False,
        max_frames_num=max_frames,
        color_correction_strength=color,
        extra_args=types.SimpleNamespace(
            use_teacache=False, use_apg=apg is not None, apg_momentum=momentum, apg_norm_threshold=threshold
        ),
    )
