"""The machine's settings: one TOML file, every key with a default and a one-line doc.

Where the file comes from: `--config FILE`, then `$INFINITETALK_CONFIG`, then `./infinitetalk.toml`;
with none of these the defaults apply (paths relative to the current directory). Relative paths
in a file are relative to the file's folder. An unknown key is an error naming the key, so a typo
fails at start-up instead of being ignored.

The field docs below are the single source of `docs/configuration.md` and of
`infinitetalk daemon --print-config` (see `render_markdown` and `render_toml`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.jobs import JobDefaults
from pipeline.choices import ATTENTION, FP8_ATTENTION, FP8_SCALING

ENV_VAR = "INFINITETALK_CONFIG"
DEFAULT_FILE = "infinitetalk.toml"


class ConfigError(ValueError):
    """A bad config file or value; the message names the file, key and value."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardSettings:
    host: str = _f("127.0.0.1", "address the dashboard binds; keep 127.0.0.1 and use an SSH tunnel")
    port: int = _f(8000, "TCP port of the dashboard", lo=1, hi=65535)
    token: str = _f(
        "",
        "if set, the dashboard asks for this bearer token (empty: no auth); hidden by --print-config",
        secret=True,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifySettings:
    """Webhooks when a job ends (daemon/webhooks.py, docs/daemon.md "Webhooks")."""

    webhook_urls: tuple[str, ...] = _f(
        (),
        "http(s) URLs POSTed a JSON body when a job ends (done, failed, rejected, cancelled); "
        "empty: no webhooks; changes need a restart",
    )
    webhook_secret: str = _f(
        "",
        "key of the X-InfiniteTalk-Signature header (sha256=<hex HMAC-SHA256 of the body>); empty: "
        "the header is left out; hidden by --print-config",
        secret=True,
    )
    webhook_timeout_s: float = _f(
        5.0, "seconds one POST may take before it counts as failed", lo=0.1, hi=300.0
    )
    webhook_retry_s: float = _f(
        600.0,
        "a delivery that fails (no answer, timeout, a status other than 2xx) is retried with backoff "
        "(1 s, doubling, at most 60 s apart) for this long after the job ended, then given up",
        hi=7 * 86400.0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionSettings:
    outputs_days: float = _f(
        0.0, "delete published videos/posters/sidecars older than this (0: keep)", hi=36500.0
    )
    archive_days: float = _f(
        30.0, "delete claimed job inputs in state_dir/jobs older than this (0: keep)", hi=36500.0
    )
    ledger_days: float = _f(
        0.0, "delete finished ledger rows and their events older than this (0: keep)", hi=36500.0
    )
    progress_events_days: float = _f(
        0.0,
        "delete the per-step progress events (not the state events) of jobs finished longer ago than "
        "this (0: keep; the events table is append-only unless a retention key says otherwise)",
        hi=36500.0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PerformanceSettings:
    """Speed settings of the resident model on CUDA (pipeline.perf.PerfConfig); ignored on the CPU,
    where the model always runs the reference-exact path."""

    rope: str = _f("fast", "fast: fp32 RoPE tables built once per shape; exact: the reference's float64 math")
    compile: bool = _f(True, "torch.compile of the repeated DiT block (first render of a shape compiles)")
    vae_dtype: str = _f("bf16", "VAE precision on CUDA: bf16 (1.6x faster decode) or fp32 (the reference)")
    channels_last: bool = _f(True, "VAE 3-D convolutions in channels-last layout (fastest cuDNN path)")
    fp8_attention: str = _f(
        "auto",
        "self-attention in fp8 (cuDNN, Hopper, package nvidia-cudnn-frontend): auto (on with "
        "fp8 weights where it can run: quant fp8, or auto on a GPU with fp8 tensor cores), on (error "
        "at start when it cannot), off",
    )
    fp8_scaling: str = _f(
        "row",
        "fp8 GEMM scales with fp8 weights: row (one activation scale per token, the row-wise kernel) or "
        "tensor (one per call, the tensor-wise kernel, the weight's row scales on the output: 1.4-1.9 % "
        "faster per 480p forward on an H200, docs/benchmarks.md section 6)",
    )
    warmup: bool = _f(True, "run one small DiT forward after loading, before READY=1 (compiles the block)")
    gpu_memory_gib: str | float = _f(
        "auto",
        "GPU memory the placement plan may use, in GiB: auto (the free memory at start minus 1.5 GiB) "
        "or a number; under it DiT blocks stream from host memory, umT5/CLIP/wav2vec2 move to the CPU "
        "or in and out, the VAE tiles; a budget no plan fits is refused at start with the smallest "
        "that works (docs/benchmarks.md section 5)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """Where the render workers run (daemon/cluster.py, docs/scaling.md); changes need a restart."""

    executor: str = _f(
        "local",
        "local: one worker process per device of this host; ray: one Ray actor per GPU of a Ray "
        "cluster (daemon/ray_pool.py; needs the `ray` extra), the daemon staying the only ledger writer",
    )
    ray_address: str = _f(
        "auto",
        "the Ray cluster to join with executor = ray: auto (the one `ray start` runs on this host), "
        "or host:port of the head's GCS (`ray start --head` prints it; the daemon must run on the head: "
        "Ray Client ray:// addresses are not supported); one that cannot be reached stops the daemon (exit 69)",
    )
    ray_namespace: str = _f("infinitetalk", "Ray namespace of the daemon's actors")
    num_gpus: float = _f(
        1.0,
        "GPUs each Ray actor reserves (one resident model each); 0: CPU actors of 1 CPU each (tests, "
        "the tiny model); the number of actors follows the cluster's resources",
        hi=64.0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the daemon, the commands and the dashboard read from the config file."""

    inbox: Path = _f(Path("inbox"), "folder watched for jobs (bundle dirs or loose NAME.json)")
    outbox: Path = _f(Path("outbox"), "folder the results are published to")
    state_dir: Path = _f(Path("var"), "daemon state: ledger.sqlite3, claimed inputs, checkpoints, lock")
    weights_dir: Path = _f(
        Path("weights"),
        "released weights (or a folder written by `infinitetalk weights tiny`); if it holds none the "
        "daemon exits 78 naming what is missing, unless allow_tiny_model",
    )
    allow_tiny_model: bool = _f(
        False,
        "when weights_dir holds no weights, render with a tiny random-weight model written under "
        "state_dir instead of refusing to start (its videos are noise: for the demo and tests only)",
    )
    device: str = _f(
        "auto",
        "torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:N; a comma list (cuda:0,cuda:1) "
        "gives one worker spanning those devices (for a multi-GPU pipeline_factory)",
    )
    devices: tuple[str, ...] = _f(
        (),
        "one render worker (one resident model) per device, e.g. "
        '["cuda:0", "cuda:1"]; empty: every visible GPU when device = auto, '
        "else device",
    )
    dtype: str = _f("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    quant: str = _f(
        "auto",
        "DiT weight quantization: auto (fp8 on GPUs with fp8 tensor cores, compute capability >= 8.9; "
        "weight-only fp8 on older GPUs where the bf16 DiT does not fit gpu_memory_gib; none on the "
        "CPU), none or fp8",
    )
    lora: tuple[str, ...] = _f(
        (), "LoRA files (relative to weights_dir) merged at load; empty: the lightx2v LoRA when present"
    )
    lora_scale: float = _f(1.0, "scale of the merged LoRA(s)", hi=10.0)
    attention: str = _f(
        "auto",
        "attention kernel: auto (Hopper: FlashAttention 4 when flash-attn-4 is installed, else cuDNN "
        "SDPA; older GPUs: flash-attn when installed), sdpa, cudnn, flash",
    )
    pipeline_factory: str = _f(
        "",
        "advanced: module:callable that builds the pipeline in a render worker from its "
        "WorkerConfig (e.g. pipeline.parallel_pipeline:from_worker_config); empty: InfiniteTalkPipeline",
    )
    max_queued: int = _f(20, "most jobs in state queued; more wait in the inbox", lo=1, hi=100_000)
    max_running: int = _f(3, "most jobs rendering at once (they share the GPU)", lo=1, hi=64)
    settle_s: float = _f(
        5.0, "a job without checksums is complete when its files are quiet this long", hi=86400.0
    )
    incomplete_timeout_s: float = _f(
        3600.0,
        "a job still incomplete after this long is rejected (monotonic clock: a step of the wall "
        "clock does not shorten it; after a restart at most half of it counts as already spent)",
        lo=1.0,
        hi=30 * 86400.0,
    )
    rescan_s: float = _f(
        10.0, "full inbox rescan period (filesystem events are only hints)", lo=0.1, hi=3600.0
    )
    tick_s: float = _f(0.5, "main loop period when idle", lo=0.01, hi=60.0)
    max_attempts: int = _f(
        3,
        "a job that fails transiently (OOM, worker crash or stall) this often ends failed; a stop or "
        "kill of the daemon itself is not counted",
        lo=1,
        hi=1000,
    )
    retry_backoff_s: float = _f(
        10.0, "first retry delay; doubles with each attempt (monotonic clock)", hi=86400.0
    )
    retry_backoff_max_s: float = _f(600.0, "longest retry delay", hi=86400.0)
    max_file_mb: float = _f(2048.0, "largest accepted media file, in MiB", hi=1024.0 * 1024)
    max_json_kb: float = _f(256.0, "largest accepted job JSON, in KiB", hi=1024.0 * 1024)
    inbox_cancel_requests: bool = _f(
        True,
        "honour cancel requests that users of the upload group drop into <inbox>/.control/ "
        "(`infinitetalk cancel --inbox`): cancel only, of waiting or queued jobs (docs/daemon.md)",
    )
    min_audio_s: float = _f(
        0.5,
        "shortest accepted speech, in seconds (shorter: audio_too_short); speech shorter than one "
        "chunk (81 frames, 3.24 s) renders as one chunk cut to the speech",
        lo=0.04,
        hi=3600.0,
    )
    max_audio_s: float = _f(
        3600.0,
        "longest accepted job, in seconds of speech (two speakers with audio_type add: the sum); "
        "longer: audio_too_long, judged before the job is queued",
        lo=1.0,
        hi=7 * 86400.0,
    )
    stream_settle_s: float = _f(
        60.0,
        "a job without checksums whose WAV header gives no size (0xFFFFFFFF, as written to a pipe "
        "or still being written in place) is complete only when its files are quiet this long",
        hi=86400.0,
    )
    stop_timeout_s: float = _f(
        120.0, "on SIGTERM, how long to wait for running jobs to reach a step boundary", hi=86400.0
    )
    worker_stall_s: float = _f(
        300.0,
        "a render worker that sends no heartbeat (it sends one every 2 s, whatever it is doing) for "
        "this long is taken as stopped or hung: it is killed and its jobs retry (an attempt each); "
        "longer than the slowest uninterruptible step",
        lo=1.0,
        hi=86400.0,
    )
    log_level: str = _f("info", "debug, info, warning or error")
    dashboard: DashboardSettings = field(
        default_factory=DashboardSettings, metadata={"doc": "the [dashboard] table"}
    )
    retention: RetentionSettings = field(
        default_factory=RetentionSettings, metadata={"doc": "the [retention] table"}
    )
    #: job settings a job leaves out: one key per row of daemon.jobs.SETTINGS that `config` allows
    defaults: JobDefaults = field(default_factory=JobDefaults, metadata={"doc": "the [defaults] table"})
    performance: PerformanceSettings = field(
        default_factory=PerformanceSettings, metadata={"doc": "the [performance] table"}
    )
    notify: NotifySettings = field(default_factory=NotifySettings, metadata={"doc": "the [notify] table"})
    cluster: ClusterSettings = field(default_factory=ClusterSettings, metadata={"doc": "the [cluster] table"})
    config_file: Path | None = field(default=None, metadata={"doc": "", "internal": True})

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "daemon.lock"

    @property
    def tiny_weights_dir(self) -> Path:
        return self.state_dir / "tiny-weights"

    @property
    def requests_dir(self) -> Path:
        """Where `cancel`/`retry`/`delete` drop requests for the daemon to apply."""
        return self.state_dir / "requests"

    @property
    def control_dir(self) -> Path:
        """Where users of the upload group drop cancel requests (`inbox_cancel_requests`)."""
        return self.inbox / ".control"

    def job_defaults(self) -> JobDefaults:
        """The `[defaults]` that `parse_job` fills missing job settings from, with the media limit."""
        return dataclasses.replace(self.defaults, max_media_bytes=int(self.max_file_mb * 1024 * 1024))


_TABLES = {
    "dashboard": DashboardSettings,
    "retention": RetentionSettings,
    "defaults": JobDefaults,
    "performance": PerformanceSettings,
    "notify": NotifySettings,
    "cluster": ClusterSettings,
}
_PATH_KEYS = ("inbox", "outbox", "state_dir", "weights_dir")
_CHOICES = {
    "device": None,
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "quant": ("auto", "none", "fp8"),
    "attention": ATTENTION,
    "rope": ("fast", "exact"),
    "vae_dtype": ("bf16", "fp32"),
    "fp8_attention": FP8_ATTENTION,
    "fp8_scaling": FP8_SCALING,
    "log_level": ("debug", "info", "warning", "error"),
    "executor": ("local", "ray"),
}
_POSITIVE = {
    "max_queued",
    "max_running",
    "max_attempts",
    "sample_steps",
    "max_file_mb",
    "max_json_kb",
    "port",
}


def find_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The config file to read: the argument, then $INFINITETALK_CONFIG, then ./infinitetalk.toml."""
    env = os.environ if environ is None else environ
    if path is not None:
        return Path(path)
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    local = Path(DEFAULT_FILE)
    return local if local.is_file() else None


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the config (see `find_config`); raise `ConfigError` naming the key on any problem."""
    chosen = find_config(path, environ)
    if chosen is None:
        return _resolve(Settings(), Path.cwd(), None)
    try:
        raw = tomllib.loads(chosen.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {chosen} does not exist") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"config file {chosen} is not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"config file {chosen} cannot be read: {e.strerror or e}") from e
    return settings_from_mapping(raw, base=chosen.resolve().parent, source=chosen.resolve())


def settings_from_mapping(raw: Mapping[str, Any], *, base: Path, source: Path | None = None) -> Settings:
    """Build the settings; every problem of the file is collected and reported in one
    `ConfigError` (one line each), not just the first."""
    where = str(source) if source else "config"
    errors: list[str] = []
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TABLES:
            if not isinstance(value, Mapping):
                errors.append(f"{where}: [{key}] must be a table, got {value!r}")
                continue
            table = _build(_TABLES[key], value, f"{where}: {key}.", errors)
            if table is not None:
                top[key] = table
        else:
            top[key] = value
    settings = _build(Settings, top, f"{where}: ", errors, skip=set(_TABLES))
    if settings is not None:
        errors += _cross_checks(settings, where)
    if errors:
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{len(errors)} problems:\n  " + "\n  ".join(errors))
    assert settings is not None
    return _resolve(settings, base, source)


def _cross_checks(s: Settings, where: str) -> list[str]:
    """Problems no single key shows: keys that must agree with each other."""
    out: list[str] = []
    if s.min_audio_s > s.max_audio_s:
        out.append(
            f"{where}: min_audio_s ({s.min_audio_s:g}) must not exceed max_audio_s ({s.max_audio_s:g})"
        )
    if not s.dashboard.host.strip():
        out.append(f"{where}: dashboard.host must not be empty")
    return out


def _build(
    cls: type,
    raw: Mapping[str, Any],
    prefix: str,
    errors: list[str],
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> Any:
    """An instance of `cls` from `raw`, or None when a key was bad (each problem appended to `errors`)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    out: dict[str, Any] = {}
    before = len(errors)
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            errors.append(f"{prefix}{key}: unknown key (known keys: {known})")
            continue
        if key in skip:
            out[key] = value
            continue
        try:
            out[key] = _coerce(fields[key], value, f"{prefix}{key}")
        except ConfigError as e:
            errors.append(str(e))
    if len(errors) > before:
        return None
    return cls(**out)


def _coerce(f: dataclasses.Field[Any], value: Any, name: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.metadata.get("optional") and value in ("", None):
        return None
    if f.name == "gpu_memory_gib":
        return _gpu_memory(value, name)
    if isinstance(default, Path):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a path string, got {value!r}")
        return Path(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        if f.name == "webhook_urls":
            for url in value:
                scheme, _, rest = url.partition("://")
                if scheme not in ("http", "https") or not rest.split("/", 1)[0]:
                    raise ConfigError(f"{name}: {url!r} is not an http:// or https:// URL with a host")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    want = kind_of(f)
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        _check_range(f, value, name)
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number ({allowed_range(f)}), got {value!r}")
        _check_range(f, value, name)
    elif want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        choices = f.metadata.get("choices") or _CHOICES.get(f.name)
        if choices and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if f.name == "device" and not _valid_device(value):
            raise ConfigError(
                f"{name} must be auto, cpu, cuda, cuda:N, or a comma list of these for one worker "
                f"spanning several devices (cuda:0,cuda:1), got {value!r}"
            )
    if (check := f.metadata.get("check")) and (why := check(value)):  # a job setting's own rule
        raise ConfigError(f"{name}: {why}")
    return value


def kind_of(f: dataclasses.Field[Any]) -> type:
    """The type a key takes: its metadata's `kind` (the job settings' table gives one), else its
    default's type (float for an unset default)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    kind: type = f.metadata.get("kind") or (type(default) if default is not None else float)
    return kind


def _gpu_memory(value: Any, name: str) -> str | float:
    if value == "auto":
        return "auto"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= 4096:
        raise ConfigError(f'{name} must be "auto" or a number of GiB > 0 and <= 4096, got {value!r}')
    return float(value)


def _bounds(f: dataclasses.Field[Any]) -> tuple[float, float | None]:
    """(lowest, highest or None) a number key accepts; keys in _POSITIVE must also be > 0."""
    return f.metadata.get("lo", 0), f.metadata.get("hi")


def allowed_range(f: dataclasses.Field[Any]) -> str:
    """The documented range of a number key, e.g. "0.01 to 60" or "> 0"."""
    lo, hi = _bounds(f)
    low = "> 0" if f.name in _POSITIVE and lo <= 0 else f">= {_num(lo)}"
    if hi is None:
        return low
    return f"> 0 and <= {_num(hi)}" if low == "> 0" else f"{_num(lo)} to {_num(hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _check_range(f: dataclasses.Field[Any], value: float, name: str) -> None:
    lo, hi = _bounds(f)
    if f.name in _POSITIVE and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r} (allowed: {allowed_range(f)})")
    if value < lo:
        raise ConfigError(f"{name} must be >= {_num(lo)}, got {value!r} (allowed: {allowed_range(f)})")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {_num(hi)}, got {value!r} (allowed: {allowed_range(f)})")


def _valid_device(value: str) -> bool:
    if value == "auto":
        return True
    parts = [p.strip() for p in value.split(",")]
    return all(p in ("cpu", "cuda") or (p.startswith("cuda:") and p[5:].isdigit()) for p in parts)


def _resolve(settings: Settings, base: Path, source: Path | None) -> Settings:
    paths = {k: (base / getattr(settings, k)).resolve() for k in _PATH_KEYS}
    return dataclasses.replace(settings, config_file=source, **paths)


# ---------------------------------------------------------------- documentation and printing


def _rows(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    rows: list[tuple[str, Any, str]] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or f.name in _TABLES:
            continue
        rows.append((prefix + f.name, getattr(instance, f.name), f.metadata["doc"]))
    return rows


def _toml_value(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return repr(value)


#: what `--print-config` shows instead of a secret that is set (dashboard token, webhook secret)
HIDDEN = "<hidden>"


def render_toml(settings: Settings | None = None, *, mask_secrets: bool = False) -> str:
    """A complete TOML file with every key, its value (default or `settings`) and its doc;
    `mask_secrets` (what `--print-config` does) shows a secret that is set as "<hidden>"."""
    lines = ["# infinitetalk.toml: every key with its doc; relative paths are relative to this file", ""]

    def emit(obj: Any, cls: type) -> None:
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or f.name in _TABLES:
                continue
            value = getattr(obj, f.name)
            if mask_secrets and f.metadata.get("secret") and value:
                value = HIDDEN
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {_toml_value(value)}")

    current = settings or Settings()
    emit(current, Settings)
    for table, cls in _TABLES.items():
        lines += ["", f"[{table}]"]
        emit(getattr(current, table), cls)
    return "\n".join(lines) + "\n"


def _allowed_doc(f: dataclasses.Field[Any]) -> str:
    """The "allowed" column: the range of a number, the choices of a string, true/false."""
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = kind_of(f)
    if isinstance(default, bool):
        return "true, false"
    if f.name == "gpu_memory_gib":
        return "`auto`, or GiB > 0 and <= 4096"
    if kind in (int, float) and not isinstance(default, (Path, tuple)):
        rule = f.metadata.get("check")  # a job setting's own rule, named by its docstring
        extra = f", {rule.__doc__}" if rule else ""
        return ("integer " if kind is int else "finite, ") + allowed_range(f) + extra
    choices = f.metadata.get("choices") or _CHOICES.get(f.name)
    return ", ".join(f"`{c}`" for c in choices) if choices else ""


def render_markdown() -> str:
    """The body of docs/configuration.md (a test checks the file is up to date)."""
    out = [
        "# Configuration",
        "",
        "<!-- generated from daemon/config.py by `python -m daemon.config`; do not edit by hand -->",
        "",
        "One TOML file, found in this order: `infinitetalk daemon --config FILE`, then the",
        "`$INFINITETALK_CONFIG` environment variable, then `./infinitetalk.toml`; with none of them",
        "every default below applies. Relative paths are relative to the config file's folder (or",
        "the current directory without a file). An unknown key is an error that names it, and a",
        "bad config makes `infinitetalk daemon` exit with status 78 (EX_CONFIG), listing every",
        "problem of the file at once, one line each (unknown keys, types, ranges, choices, and",
        "`min_audio_s` above `max_audio_s`).",
        "`infinitetalk daemon --print-config` prints the complete file with the values in effect;",
        'the secrets (`[dashboard] token`, `[notify] webhook_secret`) are shown as `"<hidden>"` when set.',
        "SIGHUP makes a running daemon re-read the caps (`max_queued`, `max_running`), timings,",
        "retention and `[defaults]`; paths and model settings need a restart.",
        "Every number must be finite (no `inf`, no `nan`) and inside the range in the `allowed`",
        "column, at start-up and at a SIGHUP reload alike; a reload with a bad value keeps the",
        "config in effect and logs one line naming the key, the value and the range.",
        "",
    ]
    sections: list[tuple[str, type]] = [("Top-level keys", Settings)] + [
        (f"[{name}]", cls) for name, cls in _TABLES.items()
    ]
    for title, cls in sections:
        out += [f"## {title}", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        allowed = {f.name: _allowed_doc(f) for f in dataclasses.fields(cls)}
        for key, default, doc in _rows(cls):
            shown = "unset" if default is None else _toml_value(default)
            out.append(f"| `{key}` | `{shown}` | {allowed[key]} | {doc} |")
        out.append("")
    out += [
        "## Example",
        "",
        "```toml",
        'inbox = "/srv/infinitetalk/inbox"',
        'outbox = "/srv/infinitetalk/outbox"',
        'state_dir = "/var/lib/infinitetalk"',
        'weights_dir = "/srv/infinitetalk/weights"',
        'quant = "fp8"',
        "max_queued = 20",
        "max_running = 3",
        "",
        "[dashboard]",
        'host = "127.0.0.1"',
        "port = 8000",
        "",
        "[defaults]",
        "sample_steps = 4",
        "```",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_markdown())
