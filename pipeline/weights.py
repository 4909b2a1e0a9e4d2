"""Load the InfiniteTalk DiT from the released files, strictly, straight to the target device.

Layout (CONTRACT.md section 9, as the model hub ships it):
    <weights>/Wan2.1-I2V-14B-480P/config.json
    <weights>/Wan2.1-I2V-14B-480P/diffusion_pytorch_model-0000{1..7}-of-00007.safetensors (by name;
        the .index.json is not read, as the reference: MultiTalk's set-up replaces it)
    <weights>/InfiniteTalk/single/infinitetalk.safetensors          (audio modules, one speaker)
    <weights>/InfiniteTalk/multi/infinitetalk.safetensors           (audio modules, two speakers)
    <weights>/InfiniteTalk/quant_models/infinitetalk_{single,multi}_fp8.safetensors (+ same-name .json)
    <weights>/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors

The model is built on the meta device; each file is memory-mapped (safetensors) and its tensors
are assigned to the model one file at a time, already on the target device and in the target
dtype, so host memory never holds more than one tensor's conversion. Every model parameter must
come from exactly the files read and every tensor in them must be used: otherwise
`WeightsError` names the missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import Tensor

from pipeline.config import WAN_DIR, DiTConfig
from pipeline.models.attention import Backend
from pipeline.models.dit import InfiniteTalkDiT, RopeMode, build_dit, is_audio_key
from pipeline.models.released import expected_shapes
from pipeline.quant import FP8, QUANT_SUFFIXES, QUANTO_FP8_NAMES, Fp8Linear, quantize_fp8, replace_module

logger = logging.getLogger(__name__)

Variant = Literal["single", "multi"]
Quant = Literal["fp8"] | None

WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WAN_SHARDS = tuple(f"diffusion_pytorch_model-{i:05d}-of-00007.safetensors" for i in range(1, 8))
LORA_FILE = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
#: runtime fp8 quantization covers the linear layers of the blocks; the small embeddings and the
#: head stay in the compute dtype (they run in float32 islands or are negligible)
FP8_RUNTIME_PREFIX = "blocks."


class WeightsError(Exception):
    """The weight files do not match the model: lists every bad key."""

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = [message]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("wrong shape", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{label} keys: {shown}")
        super().__init__("; ".join(parts))


@dataclass(frozen=True, slots=True, kw_only=True)
class DiTFiles:
    """The files one DiT load reads."""

    shards: tuple[Path, ...]
    audio: Path
    quant: Path | None = None
    quant_map: Path | None = None


def wan_shard_files(weights_dir: Path) -> tuple[Path, ...]:
    """The seven released Wan DiT shards, by name, as the reference reads them.

    The index json is not consulted: MultiTalk's set-up replaces it with one that also names
    `multitalk.safetensors` (its audio modules), and a folder prepared that way must load the
    same weights as the released one. `foreign_wan_files` reports what is ignored.
    """
    wan = Path(weights_dir) / WAN_DIR
    files = tuple(wan / n for n in WAN_SHARDS)
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise WeightsError(f"DiT shard files are missing: {', '.join(absent)}")
    return files


@dataclass(frozen=True, slots=True, kw_only=True)
class ForeignWanFiles:
    """What a Wan folder holds beyond the released DiT shards (ignored by the loader)."""

    #: file named by the index json that is not a released shard -> how many keys it is given
    index_entries: dict[str, int]
    #: `*.safetensors` files in the folder that are not released shards (e.g. multitalk.safetensors)
    extra_files: tuple[str, ...]
    #: why the index could not be read ("" when it could, or when there is none)
    index_error: str = ""

    def __bool__(self) -> bool:
        return bool(self.index_entries or self.extra_files or self.index_error)

    def describe(self) -> str:
        parts = []
        if self.index_entries:
            named = ", ".join(f"{name} ({n} keys)" for name, n in sorted(self.index_entries.items()))
            parts.append(f"{WAN_INDEX} also names {named}")
        if self.extra_files:
            parts.append(f"extra files {', '.join(self.extra_files)}")
        if self.index_error:
            parts.append(f"{WAN_INDEX} unreadable ({self.index_error})")
        hint = (
            " (MultiTalk's set-up)"
            if "multitalk.safetensors" in {*self.index_entries, *self.extra_files}
            else ""
        )
        return "; ".join(parts) + f"{hint}: ignored, only the seven released shards are read"


def foreign_wan_files(weights_dir: Path) -> ForeignWanFiles:
    """Index entries and files of the Wan folder that are not the released DiT shards."""
    wan = Path(weights_dir) / WAN_DIR
    entries: dict[str, int] = {}
    error = ""
    index = wan / WAN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
            for name in weight_map.values():
                if name not in WAN_SHARDS:
                    entries[str(name)] = entries.get(str(name), 0) + 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            error = f"{type(e).__name__}: {e}"
    extra = tuple(sorted(p.name for p in wan.glob("*.safetensors") if p.name not in WAN_SHARDS))
    return ForeignWanFiles(index_entries=entries, extra_files=extra, index_error=error)


def audio_file(weights_dir: Path, variant: Variant) -> Path:
    if variant not in ("single", "multi"):
        raise ValueError(f"variant must be 'single' or 'multi', got {variant!r}")
    return Path(weights_dir) / "InfiniteTalk" / variant / "infinitetalk.safetensors"


def quant_files(weights_dir: Path, variant: Variant) -> tuple[Path, Path]:
    base = Path(weights_dir) / "InfiniteTalk" / "quant_models" / f"infinitetalk_{variant}_fp8"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def _device_str(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def load_dit(
    weights_dir: Path,
    cfg: DiTConfig,
    *,
    variant: Variant = "single",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quant: Quant = None,
    lora: Path | None = None,
    lora_scale: float = 1.0,
    rope: RopeMode = "exact",
    attention_backend: Backend = "auto",
) -> InfiniteTalkDiT:
    """Build the DiT on the meta device and load it, strictly, onto `device` in `dtype`.

    - quant=None: the 7 Wan shards + `InfiniteTalk/<variant>/infinitetalk.safetensors`;
      then the LoRA (if any) is merged.
    - quant="fp8" without a LoRA: the official `quant_models/infinitetalk_<variant>_fp8` file when
      present (its linear layers become `Fp8Linear`); otherwise the full weights are loaded and
      the blocks' linear layers are quantized to fp8 at load time.
    - quant="fp8" with a LoRA: full weights, LoRA merged, then quantized (the official fp8 file
      cannot take a LoRA: the reference ignores the LoRA in that case, we do not).
    """
    weights_dir = Path(weights_dir)
    if quant not in (None, "fp8"):
        raise ValueError(f"quant must be None or 'fp8', got {quant!r}")
    model = build_dit(cfg)
    model.rope_mode = rope
    q_file, q_map = quant_files(weights_dir, variant)
    if quant == "fp8" and lora is None and q_file.is_file():
        load_fp8_file(model, q_file, q_map, device=device, dtype=dtype)
    else:
        files = [*wan_shard_files(weights_dir), audio_file(weights_dir, variant)]
        foreign = foreign_wan_files(weights_dir)
        if foreign:
            logger.warning("%s: %s", Path(weights_dir) / WAN_DIR, foreign.describe())
        load_files(model, files, device=device, dtype=dtype)
        if lora is not None:
            from pipeline.lora import merge_lora

            report = merge_lora(model, lora, scale=lora_scale)
            logger.info("merged LoRA %s at scale %s: %d tensors", lora.name, lora_scale, report.applied)
        if quant == "fp8":
            n = quantize_linears(model, prefix=FP8_RUNTIME_PREFIX)
            logger.info("quantized %d linear layers to fp8 at load time", n)
    model.use_attention(attention_backend)  # resolved for the device and dtype it landed on
    model.eval().requires_grad_(False)
    return model


def load_files(
    model: torch.nn.Module, files: Iterable[Path], *, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Assign every tensor of `files` to `model` (built on meta); strict over the union."""
    expected = expected_shapes(model)
    seen: dict[str, Path] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    target = _device_str(device)
    for path in files:
        if not Path(path).is_file():
            raise WeightsError(f"weight file is missing: {path}")
        chunk: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device=target) as f:
            for key in f.keys():
                if key not in expected:
                    unexpected.append(f"{key} ({Path(path).name})")
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    mismatched.append(f"{key} {list(shape)} != {list(expected[key])} ({Path(path).name})")
                    continue
                if key in seen:
                    unexpected.append(f"{key} (in both {seen[key].name} and {Path(path).name})")
                    continue
                seen[key] = Path(path)
                chunk[key] = f.get_tensor(key).to(dtype)
        if chunk and not (unexpected or mismatched):
            model.load_state_dict(chunk, strict=False, assign=True)
        del chunk
    missing = sorted(set(expected) - set(seen))
    if missing or unexpected or mismatched:
        names = ", ".join(str(p) for p in files)
        raise WeightsError(
            f"weights do not match the model ({names})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )


def load_fp8_file(
    model: InfiniteTalkDiT, path: Path, map_path: Path, *, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Load an optimum-quanto fp8 file + its quantization map into `model` (built on meta).

    Modules in the map become `Fp8Linear` (weight `._data` e4m3 + `._scale` [out, 1]); every other
    parameter is a plain tensor in the file. Coverage is checked both ways (the reference loads
    with strict=False and would leave missing layers uninitialised).
    """
    modules = dict(model.named_modules())
    qmap = _read_quant_map(map_path, path, modules)
    expected = expected_shapes(model)
    plain: dict[str, Tensor] = {}
    quantized: dict[str, dict[str, Tensor]] = {name: {} for name in qmap}
    unexpected: list[str] = []
    mismatched: list[str] = []
    with safe_open(str(path), framework="pt", device=_device_str(device)) as f:
        for key in f.keys():
            owner = next((m for m in _quant_owners(key) if m in quantized), None)
            if owner is not None:
                quantized[owner][key[len(owner) + 1 :]] = f.get_tensor(key)
            elif key in expected:
                t = f.get_tensor(key)
                if tuple(t.shape) != expected[key]:
                    mismatched.append(f"{key} {list(t.shape)} != {list(expected[key])}")
                    continue
                plain[key] = t.to(dtype)
            else:
                unexpected.append(key)
    missing = [k for k in expected if k not in plain and k.rpartition(".")[0] not in quantized]
    _check_quantized(quantized, modules, missing, unexpected, mismatched)
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path} does not match the model", missing=missing, unexpected=unexpected, mismatched=mismatched
        )
    model.load_state_dict(plain, strict=False, assign=True)
    for name, parts in quantized.items():
        bias = parts.get("bias")
        replace_module(
            model,
            name,
            Fp8Linear(
                parts["weight._data"],
                parts["weight._scale"],
                None if bias is None else bias.to(dtype),
                compute_dtype=dtype,
            ),
        )


def _read_quant_map(map_path: Path, path: Path, modules: dict[str, Any]) -> dict[str, Any]:
    """The quantization map beside `path`; every entry must name an fp8 linear layer of the model."""
    if not map_path.is_file():
        raise WeightsError(f"quantization map is missing: {map_path} (expected beside {path.name})")
    qmap: dict[str, Any] = json.loads(map_path.read_text())
    bad_modules = [
        f"{name} ({spec})"
        for name, spec in qmap.items()
        if not isinstance(modules.get(name), torch.nn.Linear)
        or not isinstance(spec, dict)
        or spec.get("weights") not in QUANTO_FP8_NAMES
    ]
    if bad_modules:
        raise WeightsError(
            f"{map_path}: entries that are not fp8 linear layers of the model: {', '.join(bad_modules)}"
        )
    return qmap


def _check_quantized(
    quantized: dict[str, dict[str, Tensor]],
    modules: dict[str, Any],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> None:
    """Add to the three lists what each quantized layer lacks, has too much of, or has wrong."""
    for name, parts in quantized.items():
        need = (*QUANT_SUFFIXES, "bias") if modules[name].bias is not None else QUANT_SUFFIXES
        missing += [f"{name}.{s}" for s in need if s not in parts]
        unexpected += [f"{name}.{s}" for s in parts if s not in need]
        if "weight._data" in parts:
            data = parts["weight._data"]
            want = tuple(modules[name].weight.shape)
            if data.dtype != FP8 or tuple(data.shape) != want:
                mismatched.append(
                    f"{name}.weight._data {data.dtype} {list(data.shape)} != float8_e4m3fn {list(want)}"
                )


def _quant_owners(key: str) -> list[str]:
    """Candidate module names for a key like `blocks.0.self_attn.q.weight._data`."""
    owners = []
    for suffix in (*QUANT_SUFFIXES, "bias"):
        if key.endswith("." + suffix):
            owners.append(key[: -len(suffix) - 1])
    return owners


def quantize_linears(model: torch.nn.Module, *, prefix: str = FP8_RUNTIME_PREFIX) -> int:
    """Replace every `nn.Linear` under `prefix` (both dims multiples of 16) by an `Fp8Linear`."""
    count = 0
    for name, module in list(model.named_modules()):
        if not name.startswith(prefix) or not isinstance(module, torch.nn.Linear):
            continue
        if module.in_features % 16 or module.out_features % 16:
            continue
        data, scale = quantize_fp8(module.weight.detach(), scale_dtype=module.weight.dtype)
        bias = None if module.bias is None else module.bias.detach()
        replace_module(model, name, Fp8Linear(data, scale, bias, compute_dtype=module.weight.dtype))
        count += 1
    return count


def split_dit_state(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split parameter names into (Wan base keys, InfiniteTalk audio keys)."""
    base: list[str] = []
    audio: list[str] = []
    for k in keys:
        (audio if is_audio_key(k) else base).append(k)
    return base, audio


@torch.no_grad()
def swap_audio_weights(model: InfiniteTalkDiT, weights_dir: Path, variant: Variant) -> None:
    """Copy the audio modules of `variant` (single/multi) into a loaded, non-quantized model.

    The Wan base is shared by both variants, so switching speakers needs only the audio file
    (about 5 GB in bf16 for the released model). Strict: every audio parameter must be in the
    file with its shape, and nothing else. A LoRA touching audio modules must be merged again.
    """
    params = {k: p for k, p in model.named_parameters() if is_audio_key(k)}
    if any(isinstance(m, Fp8Linear) for m in model.modules()):
        raise ValueError("swap_audio_weights needs a non-quantized model; reload with load_dit(variant=...)")
    path = audio_file(weights_dir, variant)
    if not path.is_file():
        raise WeightsError(f"weight file is missing: {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        unexpected = sorted(keys - set(params))
        missing = sorted(set(params) - keys)
        mismatched = sorted(
            f"{k} {list(f.get_slice(k).get_shape())} != {list(params[k].shape)}"
            for k in keys & set(params)
            if tuple(f.get_slice(k).get_shape()) != tuple(params[k].shape)
        )
        if missing or unexpected or mismatched:
            raise WeightsError(
                f"{path} does not match the model's audio modules",
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
            )
        for key in keys:
            params[key].copy_(f.get_tensor(key).to(device=params[key].device, dtype=params[key].dtype))
