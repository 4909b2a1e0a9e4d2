"""The GPU memory plan: where each model lives under a memory budget, decided once at load.

    budget = MemoryBudget(gpu_bytes=24 * GiB, host_bytes=host_memory_bytes())
    placement = plan(sizes, work, budget)      # or raises PlacementError with the smallest budget
    logger.info("%s", placement.summary())     # "budget 24.0 GiB: umT5 on CPU, CLIP in/out, ..."

Each component is `gpu` (resident), `cpu` (kept and run on the CPU) or `inout` (kept in pinned
host memory, copied onto the GPU for its use and dropped after). The DiT keeps `resident_blocks`
blocks on the GPU; the others live in pinned host memory and stream through `swap_slots` GPU
buffers (pipeline.offload.BlockSwap). The VAE encodes and decodes in `vae_tiles` spatial tiles.

The peak is modelled per GPU stage of a render (text, CLIP, VAE encode, denoise, VAE decode):
    peak = resident weights + swap slots + job-held tensors
           + wav2vec2 work of the jobs preparing at once (their CPU stage runs beside a render)
           + the largest stage's transient weights (in/out components) and activations,
and a plan fits when peak + margin <= the budget. Renders on one GPU are serialised (the
pipeline's memory slot, `InfiniteTalkPipeline.render`), so one render's working set is counted,
plus `max_running` x the wav2vec2 work of jobs preparing beside it.

Among the plans that fit, the cheapest by `COST` wins (units: about one streamed DiT block; the
copy of a streamed block hides behind the previous block's compute, so each costs little).
Pure functions of the sizes: no torch import at module level.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

GiB = 1024**3

Where = Literal["gpu", "cpu", "inout"]

#: relative cost of each choice (see the module doc); smaller is preferred
COST: Mapping[str, float] = {
    "swapped_block": 1.0,  # one DiT block streamed per forward (copy overlapped with compute)
    "clip_inout": 2.0,  # 1.2 GB copied per CLIP call (once per still image)
    "wav2vec_cpu": 2.0,  # wav2vec2-base on the CPU in the job's CPU stage
    "t5_inout": 8.0,  # 11.4 GB copied per distinct prompt (the text cache skips repeats)
    "t5_cpu": 60.0,  # umT5-XXL on the CPU: seconds per distinct prompt
    "vae_tile": 1.5,  # each VAE tile beyond the first (overlap recomputed)
}
#: DiT blocks copied in ahead of use: one computes while the next one arrives
SWAP_SLOTS = 2
#: GPU memory kept free by `gpu_memory_gib = "auto"` (CUDA context growth, other processes)
AUTO_HEADROOM_BYTES = int(1.5 * GiB)


class PlacementError(ValueError):
    """No plan fits: the message names the budget and the smallest one that would work."""

    def __init__(self, message: str, *, min_gpu_bytes: int | None = None, min_host_bytes: int | None = None):
        super().__init__(message)
        self.min_gpu_bytes = min_gpu_bytes
        self.min_host_bytes = min_host_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSizes:
    """Bytes of each component's weights as loaded (dtype and quantization applied)."""

    num_blocks: int
    block_bytes: int  # the largest DiT block
    dit_other_bytes: int  # patch/text/time embeddings, head, CLIP projector, audio projector
    t5_bytes: int
    clip_bytes: int
    wav2vec_bytes: int
    vae_bytes: int

    @property
    def dit_bytes(self) -> int:
        return self.dit_other_bytes + self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.dit_bytes + self.t5_bytes + self.clip_bytes + self.wav2vec_bytes + self.vae_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkingSet:
    """Peak activation bytes of one render's GPU stages at its largest size (weights excluded)."""

    dit_forward: int  # one DiT forward
    dit_pass_state: int  # each further guidance pass run beside it (its tokens, context, output)
    passes: int = 2  # DiT passes per step (2: audio guidance, the lightx2v recipe)
    t5: int
    clip: int
    wav2vec: int  # one job's feature extraction
    #: VAE encode/decode peak (the larger of the two) by spatial tiling (rows, cols), untiled first
    vae: tuple[tuple[tuple[int, int], int], ...]
    job_held: int  # latents, conditioning, motion and decoded frames of the rendering job


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBudget:
    """The GPU memory a plan may use, and the host memory it may keep weights in."""

    gpu_bytes: int
    host_bytes: int
    max_running: int = 1  # jobs whose CPU stage (wav2vec2) may run beside a render
    margin_bytes: int = 0  # kept free inside the budget (allocator fragmentation)
    source: str = ""  # how gpu_bytes was chosen, for the log
    device_type: str = "cuda"  # where the plan runs ("cpu": a test's stand-in budget)

    def __post_init__(self) -> None:
        if self.gpu_bytes <= 0:
            raise ValueError(f"gpu memory budget must be > 0 bytes, got {self.gpu_bytes}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where everything lives, and what that costs in GPU and host memory."""

    budget_bytes: int
    t5: Where
    clip: Where
    wav2vec: Where
    num_blocks: int
    resident_blocks: int
    swap_slots: int
    vae_tiles: tuple[int, int]
    expected_peak_bytes: int
    stage_peaks: tuple[tuple[str, int], ...]
    pinned_host_bytes: int  # streamed blocks + in/out components (page-locked)
    host_bytes: int  # everything kept off the GPU (pinned + the CPU components)
    job_slots: int = 1  # renders that may hold GPU working memory at once
    cost: float = 0.0
    source: str = ""
    quant: str = ""  # filled by the pipeline: the DiT quantization this plan was made for
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def swapped_blocks(self) -> int:
        return self.num_blocks - self.resident_blocks

    @property
    def all_resident(self) -> bool:
        return self.swapped_blocks == 0 and self.t5 == self.clip == self.wav2vec == "gpu"

    def summary(self) -> str:
        """One line: "budget 24.0 GiB: umT5 on CPU, CLIP in/out, 26 of 40 blocks swapped, ..."."""
        words = {"gpu": "resident", "cpu": "on CPU", "inout": "in/out"}
        parts = [
            f"umT5 {words[self.t5]}",
            f"CLIP {words[self.clip]}",
            f"wav2vec2 {words[self.wav2vec]}",
            f"{self.swapped_blocks} of {self.num_blocks} blocks swapped",
            "VAE untiled"
            if self.vae_tiles == (1, 1)
            else f"VAE tiled {self.vae_tiles[0]}x{self.vae_tiles[1]}",
        ]
        if self.quant:
            parts.insert(0, f"DiT {self.quant}")
        return (
            f"budget {gib(self.budget_bytes)} GiB: {', '.join(parts)}, expected peak "
            f"{gib(self.expected_peak_bytes)} GiB, host {gib(self.host_bytes)} GiB "
            f"({gib(self.pinned_host_bytes)} GiB pinned)"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the sidecar's `model.placement`, the bench report)."""
        d = asdict(self)
        d["stage_peaks_gib"] = {k: gib(v) for k, v in self.stage_peaks}
        del d["stage_peaks"], d["extra"]
        d["vae_tiles"] = list(self.vae_tiles)
        d["swapped_blocks"] = self.swapped_blocks
        d["summary"] = self.summary()
        for key in ("budget_bytes", "expected_peak_bytes", "pinned_host_bytes", "host_bytes"):
            d[key.replace("_bytes", "_gib")] = gib(d.pop(key))
        d |= dict(self.extra)
        return d


def gib(n: int | float) -> float:
    return round(n / GiB, 1) if abs(n) >= 0.05 * GiB else round(n / GiB, 4)


# ---------------------------------------------------------------------------------------------
# the planner


@dataclass(frozen=True, slots=True)
class _Choice:
    t5: Where
    clip: Where
    wav2vec: Where
    tiles: tuple[int, int]
    vae_work: int
    resident: int


def _evaluate(
    c: _Choice, sizes: ModelSizes, work: WorkingSet, budget: MemoryBudget
) -> tuple[int, dict[str, int]]:
    """(expected peak, peak per stage) of a choice."""
    n = sizes.num_blocks
    swapped = n - c.resident
    slots = min(SWAP_SLOTS, swapped)
    base = sizes.dit_other_bytes + (c.resident + slots) * sizes.block_bytes + sizes.vae_bytes
    base += sum(b for where, b in ((c.t5, sizes.t5_bytes), (c.clip, sizes.clip_bytes)) if where == "gpu")
    base += work.job_held
    if c.wav2vec == "gpu":
        base += sizes.wav2vec_bytes + budget.max_running * work.wav2vec
    stages = {
        "text": (0 if c.t5 == "cpu" else work.t5) + (sizes.t5_bytes if c.t5 == "inout" else 0),
        "clip": work.clip + (sizes.clip_bytes if c.clip == "inout" else 0),
        "vae": c.vae_work,
        "denoise": work.dit_forward + max(0, work.passes - 1) * work.dit_pass_state,
    }
    peaks = {k: base + v for k, v in stages.items()}
    return max(peaks.values()), peaks


def _cost(c: _Choice, sizes: ModelSizes) -> float:
    cost = (sizes.num_blocks - c.resident) * COST["swapped_block"]
    cost += COST["clip_inout"] if c.clip == "inout" else 0.0
    cost += COST["wav2vec_cpu"] if c.wav2vec == "cpu" else 0.0
    cost += {"gpu": 0.0, "inout": COST["t5_inout"], "cpu": COST["t5_cpu"]}[c.t5]
    cost += (c.tiles[0] * c.tiles[1] - 1) * COST["vae_tile"]
    return cost


def _host(c: _Choice, sizes: ModelSizes) -> tuple[int, int]:
    """(pinned bytes, all host bytes) that a choice keeps off the GPU."""
    pinned = (sizes.num_blocks - c.resident) * sizes.block_bytes if c.resident < sizes.num_blocks else 0
    pinned += sizes.t5_bytes if c.t5 == "inout" else 0
    pinned += sizes.clip_bytes if c.clip == "inout" else 0
    host = (
        pinned + (sizes.t5_bytes if c.t5 == "cpu" else 0) + (sizes.wav2vec_bytes if c.wav2vec == "cpu" else 0)
    )
    return pinned, host


def _choices(sizes: ModelSizes, work: WorkingSet) -> list[_Choice]:
    if not work.vae:
        raise ValueError("WorkingSet.vae needs at least the untiled entry")
    out = []
    n = sizes.num_blocks
    for t5, clip, wav, (tiles, vae_work) in itertools.product(
        ("gpu", "inout", "cpu"), ("gpu", "inout"), ("gpu", "cpu"), work.vae
    ):
        for resident in range(n, -1, -1):
            if 0 < n - resident < SWAP_SLOTS + 1 and resident != n:
                continue  # 1-2 streamed blocks need as much memory as none: keep them resident
            out.append(_Choice(t5, clip, wav, tiles, vae_work, resident))  # type: ignore[arg-type]
    return out


def plan(sizes: ModelSizes, work: WorkingSet, budget: MemoryBudget) -> Placement:
    """The cheapest placement whose expected peak (plus the margin) fits the GPU budget and whose
    host share fits the host memory. Raises `PlacementError` naming the smallest budget (GPU or
    host) that would work."""
    fits_gpu: list[tuple[float, int, _Choice, int, dict[str, int]]] = []
    need_gpu = None
    for c in _choices(sizes, work):
        peak, stages = _evaluate(c, sizes, work, budget)
        total = peak + budget.margin_bytes
        need_gpu = total if need_gpu is None else min(need_gpu, total)
        if total <= budget.gpu_bytes:
            fits_gpu.append((_cost(c, sizes), peak, c, total, stages))
    if not fits_gpu:
        assert need_gpu is not None
        raise PlacementError(
            f"GPU memory budget {gib(budget.gpu_bytes)} GiB{_src(budget)} is too small for this model: "
            f"even the smallest plan (umT5 on CPU, CLIP in/out, wav2vec2 on CPU, all "
            f"{sizes.num_blocks} DiT blocks streamed, VAE tiled) needs {gib(need_gpu)} GiB "
            f"(of it {gib(budget.margin_bytes)} GiB margin); set [performance] gpu_memory_gib to at "
            f"least {_ceil_gib(need_gpu)} or use a larger GPU",
            min_gpu_bytes=need_gpu,
        )
    fits_gpu.sort(key=lambda e: (e[0], e[1]))
    need_host = None
    for cost, peak, c, _, stages in fits_gpu:
        pinned, host = _host(c, sizes)
        need_host = host if need_host is None else min(need_host, host)
        if host <= budget.host_bytes:
            return Placement(
                budget_bytes=budget.gpu_bytes,
                t5=c.t5,
                clip=c.clip,
                wav2vec=c.wav2vec,
                num_blocks=sizes.num_blocks,
                resident_blocks=c.resident,
                swap_slots=min(SWAP_SLOTS, sizes.num_blocks - c.resident),
                vae_tiles=c.tiles,
                expected_peak_bytes=peak,
                stage_peaks=tuple(stages.items()),
                pinned_host_bytes=pinned,
                host_bytes=host,
                cost=cost,
                source=budget.source,
            )
    assert need_host is not None
    raise PlacementError(
        f"every plan that fits the GPU memory budget {gib(budget.gpu_bytes)} GiB{_src(budget)} keeps "
        f"at least {gib(need_host)} GiB of weights in host memory, but the machine has "
        f"{gib(budget.host_bytes)} GiB available; add RAM or raise gpu_memory_gib",
        min_host_bytes=need_host,
    )


def _src(budget: MemoryBudget) -> str:
    return f" ({budget.source})" if budget.source else ""


def _ceil_gib(n: int) -> float:
    return -(-int(n * 10) // GiB) / 10


# ---------------------------------------------------------------------------------------------
# sizes and working sets


#: DiT forward activation peak in bytes per (token x model width): 15.4 measured at 480p with
#: compiled blocks (H100, fp8 + fp8 attention, docs/benchmarks.md); eager is higher
DIT_ACT_PER_TOKEN_DIM = 20.0
#: VAE decode/encode peak per output pixel and frame when the whole chunk is one tile (bf16)
VAE_BYTES_PER_PIXEL_FRAME = 130.0


def dit_tokens(height: int, width: int, frame_num: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    f = (frame_num - 1) // 4 + 1
    return (f // patch[0]) * (height // 8 // patch[1]) * (width // 8 // patch[2])


def estimate_working_set(
    *,
    dim: int,
    height: int,
    width: int,
    frame_num: int,
    passes: int = 2,
    act_bytes: int = 2,
    vae_estimate: Any = None,
    text_dim: int = 4096,
    text_len: int = 512,
) -> WorkingSet:
    """Activation peaks of one render at (height, width): the DiT's from the token count, the
    VAE's from `vae_estimate(height, width, frame_num, tiles) -> bytes` when given (the VAE's own
    model, pipeline.models.vae), else from the pixel count."""
    tokens = dit_tokens(height, width, frame_num)
    dit = int(DIT_ACT_PER_TOKEN_DIM * tokens * dim)
    pass_state = int(1.25 * tokens * dim * act_bytes)
    pixels = height * width * frame_num
    vae: list[tuple[tuple[int, int], int]] = []
    for tiles in ((1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4)):
        if vae_estimate is not None:
            try:
                est = int(vae_estimate(height, width, frame_num, tiles))
            except ValueError:  # more tiles than latent pixels
                continue
        else:
            overlap = 1.0 + 0.15 * (max(tiles) - 1)
            est = int(VAE_BYTES_PER_PIXEL_FRAME * pixels / (tiles[0] * tiles[1]) * overlap)
        vae.append((tiles, est))
    frames = 3 * pixels * 4  # decoded chunk in float32
    lat = 16 * ((frame_num - 1) // 4 + 1) * (height // 8) * (width // 8)
    job_held = frames + lat * 4 * 6 + 2 * text_len * text_dim * act_bytes
    return WorkingSet(
        dit_forward=dit,
        dit_pass_state=pass_state,
        passes=passes,
        t5=int(2 * text_len * text_dim * 4 * 6),
        clip=int(0.3 * GiB) if dim >= 1024 else 1 << 20,
        wav2vec=int(0.4 * GiB) if dim >= 1024 else 1 << 20,
        vae=tuple(vae),
        job_held=int(job_held),
    )


def dit_sizes(cfg: Any, dtype: Any, quant: str | None) -> tuple[int, int]:
    """(bytes of one block, bytes of the rest) of the DiT as `load_dit` would load it, computed
    on the meta device (no memory, no files)."""
    from pipeline.models.dit import build_dit
    from pipeline.offload import module_bytes
    from pipeline.weights import quantize_linears

    model = build_dit(cfg).to(dtype=dtype)
    if quant == "fp8":
        quantize_linears(model)
    block = max(module_bytes(b) for b in model.blocks)
    return block, module_bytes(model) - sum(module_bytes(b) for b in model.blocks)


def resolve_budget(
    device: Any, setting: float | str | None, *, max_running: int = 1, host_bytes: int | None = None
) -> MemoryBudget | None:
    """The budget for `[performance] gpu_memory_gib`: "auto" is the device's free memory now
    minus `AUTO_HEADROOM_BYTES`; a number is that many GiB (on CUDA at most the free memory). On
    the CPU, "auto" or None means no plan (everything on the CPU); a number plans as if the CPU
    were a device of that size (the tests use it). None on CUDA: no plan, everything resident."""
    import torch

    device = torch.device(device)
    host = host_memory_bytes() if host_bytes is None else host_bytes
    if setting is None or (device.type != "cuda" and setting == "auto"):
        return None
    if isinstance(setting, str) and setting != "auto":
        try:
            setting = float(setting)
        except ValueError:
            raise ValueError(f'gpu_memory_gib must be "auto" or a number of GiB, got {setting!r}') from None
    if not isinstance(setting, str) and setting <= 0:
        raise ValueError(f"gpu_memory_gib must be > 0, got {setting!r}")
    if device.type != "cuda":
        return MemoryBudget(
            gpu_bytes=int(float(setting) * GiB),
            host_bytes=host,
            max_running=max_running,
            source=f"gpu_memory_gib = {setting} on {device}",
            device_type=device.type,
        )
    free, total = torch.cuda.mem_get_info(device)
    if setting == "auto":
        gpu = free - AUTO_HEADROOM_BYTES
        source = (
            f"auto: {gib(free)} GiB free of {gib(total)} GiB minus {gib(AUTO_HEADROOM_BYTES)} GiB headroom"
        )
    else:
        gpu = int(float(setting) * GiB)
        source = f"gpu_memory_gib = {setting:g}"
        if gpu > free:
            import logging

            logging.getLogger(__name__).warning(
                "gpu_memory_gib = %g is more than the %.1f GiB free on %s: planning for %.1f GiB",
                setting,
                free / GiB,
                device,
                free / GiB,
            )
            gpu, source = free, f"{source}, capped to the {gib(free)} GiB free"
    margin = max(int(0.5 * GiB), int(0.03 * gpu))
    return MemoryBudget(
        gpu_bytes=gpu, host_bytes=host, max_running=max_running, margin_bytes=margin, source=source
    )


def resolve_quant(
    requested: str | None,
    *,
    device_type: str,
    capability: tuple[int, int] | None,
    bf16_all_resident: Callable[[], bool],
) -> tuple[str | None, str]:
    """(quant, why) for `quant = "auto" | "none" | "fp8"`: auto is fp8 where the GPU has fp8
    tensor cores (compute capability >= 8.9); elsewhere on CUDA the weight-only fp8 path when the
    bf16 DiT does not stay whole on the GPU under the budget (`bf16_all_resident()` is False),
    else none; on the CPU none."""
    if requested in (None, "none"):
        return None, "quant = none"
    if requested == "fp8":
        return "fp8", "quant = fp8"
    if requested != "auto":
        raise ValueError(f'quant must be "auto", "none" or "fp8", got {requested!r}')
    if device_type != "cuda" or capability is None:
        return None, f"auto: none on {device_type}"
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) >= (8, 9):
        return "fp8", f"auto: fp8 (compute capability {cc} has fp8 tensor cores)"
    if bf16_all_resident():
        return None, f"auto: none (compute capability {cc}; the bf16 DiT fits the budget whole)"
    return "fp8", (
        f"auto: weight-only fp8 (compute capability {cc} has no fp8 tensor cores and the bf16 DiT "
        "does not fit the budget whole)"
    )


def host_memory_bytes() -> int:
    """RAM the plan may keep weights in: MemAvailable (Linux), else the physical total."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


__all__ = [
    "COST",
    "GiB",
    "MemoryBudget",
    "ModelSizes",
    "Placement",
    "PlacementError",
    "WorkingSet",
    "dit_sizes",
    "estimate_working_set",
    "host_memory_bytes",
    "plan",
    "resolve_budget",
    "resolve_quant",
]
