"""Check a weights folder: which files, keys, shapes and dtypes are present, missing or wrong.

Works for the released layout (full size, hyper-parameters from `config.json`) and for a folder
written by `infinitetalk weights tiny` (hyper-parameters from `tiny.json`). Only file headers are
read for safetensors; `.pth` files are memory-mapped where possible. Optional files (the
two-speaker weights, the lightx2v LoRA unless the config names it, the fp8 models) are reported as
notes when absent, and so are files that are not part of the released layout (MultiTalk's index and
`multitalk.safetensors` in the Wan folder): the loader ignores them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import TINY_JSON, WAN_DIR, ModelConfig, ignored_wan_keys, load_model_config

Status = Literal["ok", "missing", "wrong", "note"]

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_TOKENIZER = "xlm-roberta-large"
WAV2VEC_DIR = "chinese-wav2vec2-base"
FLOAT_DTYPES = ("F32", "F16", "BF16", "float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    path: str  # relative to the weights folder
    status: Status
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    weights_dir: Path
    tiny: bool
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.status in ("missing", "wrong") for f in self.findings)

    def format(self) -> str:
        kind = "tiny (tiny.json)" if self.tiny else "full size"
        lines = [f"weights folder {self.weights_dir} [{kind}]"]
        for f in self.findings:
            lines.append(f"  {f.status.upper():8s} {f.path}: {f.detail}")
        bad = sum(f.status in ("missing", "wrong") for f in self.findings)
        lines.append("result: OK" if self.ok else f"result: {bad} problem(s)")
        return "\n".join(lines)


Header = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)


def safetensors_header(path: Path) -> Header:
    """Keys, shapes and dtypes of a safetensors file, from its JSON header only."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


def pth_header(path: Path) -> Header:
    from pipeline.models.released import load_pth

    state: Any = load_pth(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def compare_keys(
    rel: str,
    found: Header,
    expected: dict[str, tuple[int, ...]],
    dtype_ok: Callable[[str, str], bool] | None = None,
) -> list[Finding]:
    """Findings for one set of tensors against the expected shapes."""
    dtype_ok = dtype_ok or (lambda _key, dt: dt in FLOAT_DTYPES)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k} {list(found[k][0])} (expected {list(expected[k])})"
        for k in set(found) & set(expected)
        if found[k][0] != tuple(expected[k])
    )
    dtypes = sorted(f"{k} {found[k][1]}" for k in found if k in expected and not dtype_ok(k, found[k][1]))
    out = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", shapes),
        ("wrong dtypes", dtypes),
    ):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            out.append(
                Finding(
                    path=rel,
                    status="missing" if label == "missing keys" else "wrong",
                    detail=f"{label}: {shown}",
                )
            )
    if not out:
        kinds = sorted({dt for _, dt in found.values()})
        out.append(Finding(path=rel, status="ok", detail=f"{len(found)} tensors, dtypes {', '.join(kinds)}"))
    return out


def _check_file(
    root: Path,
    rel: str,
    read: Callable[[Path], Header],
    expected: dict[str, tuple[int, ...]],
    *,
    optional: bool = False,
    why: str = "",
    dtype_ok: Callable[[str, str], bool] | None = None,
) -> list[Finding]:
    path = root / rel
    if not path.is_file():
        note = f" (optional: {why})" if optional and why else " (optional)" if optional else ""
        return [Finding(path=rel, status="note" if optional else "missing", detail="file not present" + note)]
    try:
        found = read(path)
    except Exception as e:  # an unreadable file is a finding, not a crash of the check
        return [Finding(path=rel, status="wrong", detail=f"cannot read: {type(e).__name__}: {e}")]
    return compare_keys(rel, found, expected, dtype_ok)


def check_weights(weights_dir: Path, *, loras: Sequence[str | Path] = ()) -> CheckReport:
    """Inspect `weights_dir` and report every file of the released layout.

    `MISSING`/`WRONG` (and `ok` False) only for what a render needs: the config, the Wan shards,
    the one-speaker audio file, the encoders and tokenizers, and the LoRA files in `loras` (the
    config's `lora` list, relative to the folder or absolute). Optional files absent are `NOTE`s:
    the two-speaker file, the lightx2v LoRA when `loras` is empty (merged only when present), the
    fp8 files, Kokoro-82M (text-to-speech jobs). A file that is present is checked in full either way.
    """
    root = Path(weights_dir)
    lora_names = tuple(str(p) for p in loras)
    tiny = (root / TINY_JSON).is_file()
    findings: list[Finding] = []
    try:
        cfg = load_model_config(root)
    except (OSError, ValueError, TypeError) as e:
        rel = TINY_JSON if tiny else f"{WAN_DIR}/config.json"
        findings.append(
            Finding(
                path=rel, status="missing" if isinstance(e, FileNotFoundError) else "wrong", detail=str(e)
            )
        )
        return CheckReport(weights_dir=root, tiny=tiny, findings=tuple(findings))
    findings.append(
        Finding(
            path=TINY_JSON if tiny else f"{WAN_DIR}/config.json",
            status="ok",
            detail=f"DiT dim {cfg.dit.dim}, {cfg.dit.num_layers} blocks, {cfg.dit.num_heads} heads",
        )
    )
    if not tiny:
        ignored = ignored_wan_keys(json.loads((root / WAN_DIR / "config.json").read_text()))
        if ignored:
            findings.append(
                Finding(
                    path=f"{WAN_DIR}/config.json",
                    status="note",
                    detail=f"keys the DiT does not use, ignored (as the reference): {', '.join(ignored)}",
                )
            )
    findings += _check_dit(root, cfg, lora_names)
    findings += _check_encoders(root, cfg)
    from pipeline.tts_check import check_kokoro  # text-to-speech: optional

    findings += check_kokoro(root)
    return CheckReport(weights_dir=root, tiny=tiny, findings=tuple(findings))


def _check_dit(root: Path, cfg: ModelConfig, loras: tuple[str, ...]) -> list[Finding]:
    from pipeline.models.dit import dit_param_shapes, is_audio_key
    from pipeline.weights import LORA_FILE, foreign_wan_files

    shapes = dit_param_shapes(cfg.dit)
    base = {k: v for k, v in shapes.items() if not is_audio_key(k)}
    audio = {k: v for k, v in shapes.items() if is_audio_key(k)}
    # the loader reads the seven shards by name (as the reference); the index is informational
    foreign = foreign_wan_files(root)
    out, weight_map = _check_wan_index(root, foreign.index_error)
    if foreign:
        out.append(Finding(path=f"{WAN_DIR}/", status="note", detail=foreign.describe()))
    shard_findings, union = _check_wan_shards(root, weight_map)
    out += shard_findings
    out += compare_keys(f"{WAN_DIR}/ (all shards)", union, base)
    for variant, optional in (("single", False), ("multi", True)):
        out += _check_file(
            root,
            f"InfiniteTalk/{variant}/infinitetalk.safetensors",
            safetensors_header,
            audio,
            optional=optional,
            why="two-speaker jobs need it" if optional else "",
        )
    for variant in ("single", "multi"):
        out += _check_fp8(root, f"InfiniteTalk/quant_models/infinitetalk_{variant}_fp8", shapes)
    if LORA_FILE not in loras:
        out += _check_lora(root, LORA_FILE, shapes, optional=True)
    for lora in loras:
        out += _check_lora(root, lora, shapes, optional=False)
    return out


def _check_wan_index(root: Path, index_error: str) -> tuple[list[Finding], dict[str, str]]:
    """The Wan shard index's findings and its key -> shard map (empty when absent or unreadable)."""
    from pipeline.weights import WAN_INDEX, WAN_SHARDS

    wan = root / WAN_DIR
    index_rel = f"{WAN_DIR}/{WAN_INDEX}"
    if not (wan / WAN_INDEX).is_file():
        return [Finding(path=index_rel, status="note", detail="no index; the 7 released shards are read")], {}
    if index_error:
        detail = f"unreadable ({index_error}); not needed: the 7 released shards are read"
        return [Finding(path=index_rel, status="note", detail=detail)], {}
    weight_map = {
        k: v for k, v in json.loads((wan / WAN_INDEX).read_text())["weight_map"].items() if v in WAN_SHARDS
    }
    detail = f"{len(weight_map)} keys in {len(set(weight_map.values()))} shards"
    return [Finding(path=index_rel, status="ok", detail=detail)], weight_map


def _check_wan_shards(root: Path, weight_map: dict[str, str]) -> tuple[list[Finding], Header]:
    """Each released Wan shard's findings and the union of their headers."""
    from pipeline.weights import WAN_SHARDS

    out: list[Finding] = []
    union: Header = {}
    for name in WAN_SHARDS:
        rel = f"{WAN_DIR}/{name}"
        path = root / rel
        if not path.is_file():
            out.append(Finding(path=rel, status="missing", detail="DiT shard not present"))
            continue
        header = safetensors_header(path)
        wrong_place = sorted(k for k in header if weight_map and weight_map.get(k) != name)
        if wrong_place:
            out.append(
                Finding(
                    path=rel,
                    status="note",
                    detail="keys the index puts elsewhere (harmless: the index is not read): "
                    + ", ".join(wrong_place[:12]),
                )
            )
        out.append(Finding(path=rel, status="ok", detail=f"{len(header)} tensors"))
        union.update(header)
    return out, union


def _check_lora(root: Path, rel: str, shapes: dict[str, tuple[int, ...]], *, optional: bool) -> list[Finding]:
    """A LoRA file's targets against the DiT's parameters (relative to `root`, or absolute)."""
    from pipeline.lora import plan_lora

    lora_path = root / rel
    if not lora_path.is_file():
        if optional:
            why = "optional: merged when present; the 4-step job defaults need it"
            return [Finding(path=rel, status="note", detail=f"lightx2v LoRA not present ({why})")]
        return [Finding(path=rel, status="missing", detail="LoRA named by the config (lora) not present")]
    try:
        header = safetensors_header(lora_path)
    except (OSError, ValueError) as e:
        return [Finding(path=rel, status="wrong", detail=f"cannot read: {type(e).__name__}: {e}")]
    targets, ignored, bad = plan_lora(list(header))
    for target, sources in targets.items():
        if target not in shapes:
            bad.append(f"{sources[0]} (no parameter {target})")
        elif len(sources) == 2:
            down, up = header[sources[0]][0], header[sources[1]][0]
            if len(down) != 2 or len(up) != 2:
                bad.append(f"{sources[0]} (lora_down {list(down)} / lora_up {list(up)} are not 2-D)")
                continue
            (r, n_in), (n_out, r2) = down, up
            if r != r2 or (n_out, n_in) != shapes[target]:
                bad.append(f"{sources[0]} (delta [{n_out}, {n_in}] != {list(shapes[target])})")
        elif header[sources[0]][0] != shapes[target]:
            bad.append(f"{sources[0]} ({list(header[sources[0]][0])} != {list(shapes[target])})")
    if bad:
        return [Finding(path=rel, status="wrong", detail="; ".join(bad[:12]))]
    return [
        Finding(
            path=rel,
            status="ok",
            detail=f"{len(targets)} target tensors, {len(ignored)} keys ignored as the reference "
            "ignores them (alpha, diff_m, PEFT, unprefixed)",
        )
    ]


def _check_fp8(root: Path, stem: str, shapes: dict[str, tuple[int, ...]]) -> list[Finding]:
    from pipeline.quant import QUANT_SUFFIXES, QUANTO_FP8_NAMES

    data_rel, map_rel = f"{stem}.safetensors", f"{stem}.json"
    if not (root / data_rel).is_file():
        return [Finding(path=data_rel, status="note", detail="not present (optional: fp8 model)")]
    if not (root / map_rel).is_file():
        return [
            Finding(path=map_rel, status="missing", detail=f"quantization map for {data_rel} not present")
        ]
    qmap = json.loads((root / map_rel).read_text())
    bad_map = sorted(
        m
        for m, s in qmap.items()
        if f"{m}.weight" not in shapes or not isinstance(s, dict) or s.get("weights") not in QUANTO_FP8_NAMES
    )
    expected: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        owner, _, leaf = key.rpartition(".")
        if owner in qmap and leaf == "weight":
            expected[f"{owner}.weight._data"] = shape
            expected[f"{owner}.weight._scale"] = (shape[0], 1)
            expected[f"{owner}.input_scale"] = ()
            expected[f"{owner}.output_scale"] = ()
        else:
            expected[key] = shape

    def dtype_ok(key: str, dt: str) -> bool:
        return dt in ("F8_E4M3", "float8_e4m3fn") if key.endswith("._data") else dt in FLOAT_DTYPES

    out = compare_keys(data_rel, safetensors_header(root / data_rel), expected, dtype_ok)
    if bad_map:
        out.append(
            Finding(
                path=map_rel,
                status="wrong",
                detail=f"entries that are not fp8 linear layers: {', '.join(bad_map[:12])}",
            )
        )
    else:
        out.append(
            Finding(path=map_rel, status="ok", detail=f"{len(qmap)} fp8 layers ({', '.join(QUANT_SUFFIXES)})")
        )
    return out


def _check_encoders(root: Path, cfg: ModelConfig) -> list[Finding]:
    from pipeline.models import clip, t5, vae

    out: list[Finding] = []
    out += _check_file(root, f"{WAN_DIR}/{VAE_FILE}", pth_header, vae.checkpoint_shapes(cfg.vae))
    out += _check_file(root, f"{WAN_DIR}/{T5_FILE}", pth_header, t5.checkpoint_shapes(cfg.t5))
    clip_rel = f"{WAN_DIR}/{CLIP_FILE}"
    clip_findings = _check_file(root, clip_rel, pth_header, clip.checkpoint_shapes(cfg.clip))
    out += clip_findings
    if (root / clip_rel).is_file() and all(f.status == "ok" for f in clip_findings):
        unused = ", ".join(p.rstrip(".") for p in clip.unused_prefixes(cfg.clip))
        out.append(
            Finding(
                path=clip_rel, status="note", detail=f"present but not used by the visual features: {unused}"
            )
        )
    # the T5 tokenizer is read from tokenizer.json (pipeline.models.t5.load_tokenizer); the XLM-R
    # one is part of the layout but unused (CLIP's text tower is not run)
    for rel, need in (
        (T5_TOKENIZER, ("tokenizer.json",)),
        (CLIP_TOKENIZER, ("tokenizer.json", "sentencepiece.bpe.model")),
    ):
        folder = root / WAN_DIR / rel
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        has_vocab = any(n in files for n in need)
        out.append(
            Finding(
                path=f"{WAN_DIR}/{rel}/",
                status="ok" if has_vocab else "missing",
                detail=", ".join(files) if has_vocab else f"{' or '.join(need)} not present",
            )
        )
    w2v = root / WAV2VEC_DIR
    for name in ("config.json", "preprocessor_config.json"):
        present = (w2v / name).is_file()
        out.append(
            Finding(
                path=f"{WAV2VEC_DIR}/{name}",
                status="ok" if present else "missing",
                detail="present" if present else "not present",
            )
        )
    if (w2v / "config.json").is_file():
        out += _check_wav2vec(root)
    return out


def _check_wav2vec(root: Path) -> list[Finding]:
    """The `wav2vec2.` encoder keys must all be there; pre-training heads may or may not be."""
    from pipeline.tiny_encoders import wav2vec_checkpoint_shapes

    hub = json.loads((root / WAV2VEC_DIR / "config.json").read_text())
    need = {
        _weight_norm_name(k): v
        for k, v in wav2vec_checkpoint_shapes(hub).items()
        if k.startswith("wav2vec2.")
    }
    for name, reader in (("model.safetensors", safetensors_header), ("pytorch_model.bin", pth_header)):
        if (root / WAV2VEC_DIR / name).is_file():
            found = {
                _weight_norm_name(k): v
                for k, v in reader(root / WAV2VEC_DIR / name).items()
                if k.startswith("wav2vec2.")
            }
            return compare_keys(f"{WAV2VEC_DIR}/{name}", found, need)
    return [
        Finding(
            path=f"{WAV2VEC_DIR}/model.safetensors",
            status="missing",
            detail="neither model.safetensors nor pytorch_model.bin present",
        )
    ]


def _weight_norm_name(key: str) -> str:
    """Old and new names of the positional conv's weight norm compare equal."""
    return key.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"
    )


def dit_files_digest(weights_dir: Path) -> str:
    """sha256 over the DiT files of a folder (shards, audio files, LoRA): what parity fixtures used."""
    from pipeline.weights import LORA_FILE

    root = Path(weights_dir)
    paths: Iterable[Path] = [
        *sorted((root / WAN_DIR).glob("diffusion_pytorch_model-*.safetensors")),
        *(root / "InfiniteTalk" / v / "infinitetalk.safetensors" for v in ("single", "multi")),
        root / LORA_FILE,
    ]
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()
