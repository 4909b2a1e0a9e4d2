"""Job files: parse and validate a job JSON into a `JobSpec`, then turn it into a render request.

A job keeps the reference model's JSON format (CONTRACT.md section 4), so the reference's own
example files work unchanged:

    {"prompt": "...", "cond_video": "face.png", "cond_audio": {"person1": "voice.wav"}}

plus the generation settings under the reference CLI's names (`size`, `sample_steps`,
`sample_shift`, `sample_text_guide_scale`, `sample_audio_guide_scale`, `seed`, `mode`,
`motion_frame`, `max_frame_num`, `color_correction_strength`, `use_apg`, `apg_momentum`,
`apg_norm_threshold`), and `noise`, `priority`, `checksums`,
`negative_prompt`. Missing settings come from `JobDefaults` (filled by the daemon's config);
a missing seed is drawn here and recorded in the spec, so every render can be repeated.

`parse_job` collects every problem it finds into one `InvalidJob`, each with an error code and
the field (or file) at fault. Only the standard library is used: the daemon calls this at
intake without loading the ML stack.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.types import NOISE_MODES, GenerationRequest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".m4a", ".ogg")
#: a speech track may also be a video's sound, as in the reference (it extracts the audio of
#: .mp4/.mov/.avi/.mkv); the video picture is not used
SPEECH_EXTENSIONS = AUDIO_EXTENSIONS + VIDEO_EXTENSIONS + (".avi",)
SIZES = ("infinitetalk-480", "infinitetalk-720")
MODES = ("streaming", "clip")
AUDIO_TYPES = ("para", "add")
PERSONS = ("person1", "person2")
# the reference's marker for a silent speaker in a two-speaker job (zeros as long as the other's speech)
SILENT = "None"
#: the reference's shift rule when a job gives none and the defaults give none
SHIFT_BY_SIZE = {"infinitetalk-480": 7.0, "infinitetalk-720": 11.0}
SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1 (fits every RNG the pipeline seeds)
MAX_STEPS = 1000
#: deepest nesting of arrays/objects a job JSON may have (a job needs 3; 100,000 would crash the
#: JSON parser with RecursionError)
MAX_JSON_DEPTH = 32
#: longest media path (bytes) and path component (NAME_MAX) a job may name
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
#: deepest folder nesting under a job's folder (a media path's parts, a bundle's tree)
MAX_FOLDER_DEPTH = 32
#: the largest job file `load_job` reads (the daemon's own limit is `max_json_kb`)
MAX_JOB_FILE_BYTES = 16 * 1024 * 1024
#: flags for every open of an uploaded file: never through a final symbolic link, never blocking
#: on a FIFO (a FIFO named voice.wav or x.json must not hang the daemon)
#: a loose job's rule for its media paths: why a normalised path may not be taken, or None
LoosePathRule = Callable[[str], str | None]
SAFE_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class NotRegularFile(OSError):
    """An upload opened by `open_regular` that is not a regular file (a FIFO, a device, a folder)."""


def open_regular(path: Path | str, *, dir_fd: int | None = None) -> int:
    """Open an uploaded file read-only and return the descriptor: never through a final symbolic
    link (ELOOP), never blocking (O_NONBLOCK, so a FIFO cannot hang the caller), and only a
    regular file (`NotRegularFile` otherwise). The descriptor is back in blocking mode."""
    fd = os.open(path, SAFE_OPEN_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{os.fsdecode(path)!r} is {describe_mode(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, *, max_bytes: int) -> bytes:
    """The bytes of a regular file opened with `open_regular`; OSError if it holds more than
    `max_bytes` (never reads more than that plus one)."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"{os.fsdecode(path)!r} is over {max_bytes} bytes")
    return data


def describe_mode(mode: int) -> str:
    """'a FIFO', 'a directory', ... for an lstat mode (in error messages)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if the JSON text nests arrays/objects deeper than `limit` (brackets inside strings
    do not count), checked in one linear pass before parsing, so a hostile file can never reach
    the parser's recursion limit (RecursionError)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    skip_to = -1  # the character after a backslash inside a string is escaped
    for match in _JSON_TOKENS.finditer(text):
        at = match.start()
        if at < skip_to:
            continue
        token = match.group()
        if in_string:
            if token == "\\":
                skip_to = at + 2
            elif token == '"':
                in_string = False
        elif token == '"':
            in_string = True
        elif token in "[{":
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


_JSON_TOKENS = re.compile(r'["\\\[\]{}]')

#: the negative prompt the InfiniteTalk config uses (model.md 1.5); sent with every render
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

#: every key a job may carry
KNOWN_KEYS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "cond_video",
        "cond_audio",
        "audio_type",
        "bbox",
        "size",
        "sample_steps",
        "sample_shift",
        "sample_text_guide_scale",
        "sample_audio_guide_scale",
        "seed",
        "mode",
        "motion_frame",
        "max_frame_num",
        "color_correction_strength",
        "use_apg",
        "apg_momentum",
        "apg_norm_threshold",
        "noise",
        "priority",
        "checksums",
        "rerender",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobDefaults:
    """Settings a job may leave out. The daemon's config fills these; the values below are the
    lightx2v 4-step recipe (LoRA merged at load): 4 steps, shift 2, text scale 1 (so 2 DiT passes
    per step), audio scale 2. `PRESETS["base"]` is the reference's 40-step recipe without LoRA."""

    size: str = "infinitetalk-480"
    sample_steps: int = 4
    sample_shift: float | None = 2.0  # None: the reference's rule, 7 for 480 and 11 for 720
    sample_text_guide_scale: float = 1.0
    sample_audio_guide_scale: float = 2.0
    mode: str = "streaming"
    motion_frame: int = 9
    max_frame_num: int | None = None  # None: no cap, the whole audio is rendered
    color_correction_strength: float = 1.0
    use_apg: bool = False  # adaptive projected guidance (the reference's --use_apg)
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    audio_type: str = "para"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    priority: int = 0
    seed: int | None = None  # seed for jobs that give none; None: drawn at random (and recorded)
    noise: str = "portable"  # where the noise is drawn: portable (CPU) or reference (render device)
    max_media_bytes: int = 4 * 1024**3  # a media file larger than this is rejected (too_large)


#: named sets of defaults: the lightx2v 4-step recipe and the reference's base recipe
PRESETS: dict[str, JobDefaults] = {
    "lightx2v-4step": JobDefaults(),
    "base": JobDefaults(
        sample_steps=40, sample_shift=None, sample_text_guide_scale=5.0, sample_audio_guide_scale=4.0
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobError:
    """One problem in a job: a code (see docs/job-format.md), what is wrong, and where."""

    code: str
    message: str
    field: str  # the JSON key (dotted for nested ones, e.g. "cond_audio.person1"), or "" for the document


class InvalidJob(ValueError):
    """A job that cannot be rendered. `errors` lists every problem; `code`, `message` and `field`
    describe the first one (what a one-line report shows); `str()` lists them all."""

    def __init__(self, errors: list[JobError] | tuple[JobError, ...]) -> None:
        if not errors:
            raise ValueError("InvalidJob needs at least one error")
        self.errors = tuple(errors)
        first = self.errors[0]
        self.code = first.code
        self.field = first.field
        self.message = "; ".join(e.message for e in self.errors)
        super().__init__(self.message)

    @classmethod
    def single(cls, code: str, message: str, field: str = "") -> InvalidJob:
        return cls([JobError(code=code, message=message, field=field)])


#: JobSpec fields added after the first release: absent from older stored specs, then defaulted
_OPTIONAL_SPEC_FIELDS = frozenset({"use_apg", "apg_momentum", "apg_norm_threshold", "noise", "rerender"})


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """A validated job with every default resolved: exactly what will be rendered.

    Media paths are POSIX paths relative to the job's base directory (the bundle directory or
    the inbox). `cond_audio` is one (person, path) pair per speaker, person1 first.
    """

    prompt: str
    cond_video: str
    cond_audio: tuple[tuple[str, str], ...]
    audio_type: str
    bbox: tuple[tuple[float, float, float, float], ...] | None
    size: str
    sample_steps: int
    sample_shift: float
    sample_text_guide_scale: float
    sample_audio_guide_scale: float
    seed: int
    seed_drawn: bool  # True when the job gave no seed and parse_job drew one
    mode: str
    motion_frame: int
    max_frame_num: int | None
    color_correction_strength: float
    negative_prompt: str
    priority: int
    checksums: tuple[tuple[str, str], ...] = field(default=())
    # later additions have defaults, so specs stored by an older version still load
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    noise: str = "portable"
    #: render again even when an identical job was done before (not part of the dedupe key)
    rerender: bool = False

    @property
    def media_files(self) -> tuple[str, ...]:
        """The job's media paths (relative), reference first, then the speakers in order (a
        silent speaker has no file)."""
        return (self.cond_video, *(path for _, path in self.cond_audio if path != SILENT))

    @property
    def is_video(self) -> bool:
        return PurePosixPath(self.cond_video).suffix.lower() in VIDEO_EXTENSIONS

    @property
    def num_speakers(self) -> int:
        return len(self.cond_audio)

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as a JSON-able dict in the job format (seed included); what
        the ledger stores as `spec_json` and the outbox JSON reports."""
        out = asdict(self)
        out["cond_audio"] = dict(self.cond_audio)
        out["bbox"] = (
            None
            if self.bbox is None
            else {p: list(b) for (p, _), b in zip(self.cond_audio, self.bbox, strict=True)}
        )
        out["checksums"] = dict(self.checksums)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec from `to_dict()` output (e.g. the ledger's `spec_json`)."""
        audio = tuple((str(p), str(v)) for p, v in dict(data["cond_audio"]).items())
        bbox_map = data.get("bbox")
        bbox = None if bbox_map is None else tuple(_box4(bbox_map[p]) for p, _ in audio)
        kwargs = {
            k: data[k]
            for k in cls.__dataclass_fields__
            if k not in ("cond_audio", "bbox", "checksums") and (k in data or k not in _OPTIONAL_SPEC_FIELDS)
        }
        return cls(
            **kwargs,
            cond_audio=audio,
            bbox=bbox,
            checksums=tuple(sorted(dict(data.get("checksums") or {}).items())),
        )

    def to_request(self, base_dir: Path) -> GenerationRequest:
        """The pipeline's request for this job, media paths made absolute under `base_dir`."""
        base = Path(base_dir).absolute()
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            cond_media=base / self.cond_video,
            audio=tuple(None if path == SILENT else base / path for _, path in self.cond_audio),
            audio_type=self.audio_type,  # type: ignore[arg-type]
            bbox=self.bbox,
            size=self.size,  # type: ignore[arg-type]
            sample_steps=self.sample_steps,
            sample_shift=self.sample_shift,
            sample_text_guide_scale=self.sample_text_guide_scale,
            sample_audio_guide_scale=self.sample_audio_guide_scale,
            seed=self.seed,
            mode=self.mode,  # type: ignore[arg-type]
            motion_frame=self.motion_frame,
            max_frame_num=self.max_frame_num,
            color_correction_strength=self.color_correction_strength,
            use_apg=self.use_apg,
            apg_momentum=self.apg_momentum,
            apg_norm_threshold=self.apg_norm_threshold,
            noise=self.noise,  # type: ignore[arg-type]
        )

    def with_seed(self, seed: int) -> JobSpec:
        return replace(self, seed=seed, seed_drawn=False)


def _box4(values: Any) -> tuple[float, float, float, float]:
    a, b, c, d = (float(v) for v in values)
    return (a, b, c, d)


# ---------------------------------------------------------------------------------------------
# parsing


class _Collector:
    """Gathers every error of one job, so the user fixes them all in one go."""

    def __init__(self) -> None:
        self.errors: list[JobError] = []

    def add(self, code: str, field: str, message: str) -> None:
        self.errors.append(JobError(code=code, message=message, field=field))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _get_int(
    doc: dict[str, Any], key: str, default: int | None, lo: int, hi: int, c: _Collector
) -> int | None:
    if key not in doc:
        return default
    value = doc[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        c.add("bad_type", key, f"{key} must be an integer, got {value!r}")
        return default
    if not lo <= value <= hi:
        c.add("bad_value", key, f"{key} must be between {lo} and {hi}, got {value}")
        return default
    return int(value)


def _get_float(
    doc: dict[str, Any], key: str, default: float | None, lo: float, hi: float, c: _Collector
) -> float | None:
    if key not in doc:
        return default
    value = doc[key]
    if not _is_number(value):
        c.add("bad_type", key, f"{key} must be a number, got {value!r}")
        return default
    if not lo <= value <= hi:
        c.add("bad_value", key, f"{key} must be between {lo:g} and {hi:g}, got {value!r}")
        return default
    return float(value)


def _get_bool(doc: dict[str, Any], key: str, default: bool, c: _Collector) -> bool:
    if key not in doc:
        return default
    value = doc[key]
    if not isinstance(value, bool):
        c.add("bad_type", key, f"{key} must be true or false, got {value!r}")
        return default
    return value


def _get_choice(doc: dict[str, Any], key: str, default: str, choices: tuple[str, ...], c: _Collector) -> str:
    if key not in doc:
        return default
    value = doc[key]
    if value not in choices:
        c.add("bad_value", key, f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return default
    return str(value)


def normalise_media_path(raw: str) -> str | None:
    """A job's media path as the job's files are keyed (POSIX, relative, no "." parts), or None
    for a path that leaves the job's folder (absolute, a drive, "~", or a ".." part)."""
    text = raw.strip().replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":") or text.startswith("~"):
        return None
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _bad_path_text(raw: str) -> str | None:
    """Why a path string can name no file at all (a NUL or control character, too long), or None."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        return "holds a NUL or control character"
    encoded = raw.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES or any(
        len(part) > MAX_NAME_BYTES for part in encoded.replace(b"\\", b"/").split(b"/")
    ):
        return f"is too long (over {MAX_PATH_BYTES} bytes, or a name over {MAX_NAME_BYTES})"
    if raw.replace("\\", "/").count("/") >= MAX_FOLDER_DEPTH:
        return f"nests more than {MAX_FOLDER_DEPTH} folders deep"
    return None


def check_media_path(
    raw: Any,
    *,
    base_dir: Path,
    field: str,
    extensions: tuple[str, ...],
    max_bytes: int,
    c: _Collector,
    loose_paths: LoosePathRule | None = None,
) -> str | None:
    """Validate one media path of a job; returns it normalised (POSIX, relative) or None.
    `loose_paths` (a loose job in the inbox): says why a path may not be taken (a file inside
    another client's bundle, a hidden or temporary name: `path_escape`), or None."""
    if not isinstance(raw, str) or not raw.strip():
        c.add("bad_type", field, f"{field} must be a non-empty file path string, got {raw!r}")
        return None
    problem = _bad_path_text(raw)
    if problem is not None:
        c.add("bad_value", field, f"{field}: the path {raw!r} {problem}")
        return None
    rel = normalise_media_path(raw)
    if rel is None:
        c.add(
            "path_escape",
            field,
            f"{field}: {raw!r} leaves the job's folder (absolute paths and '..' are not allowed); "
            "name a file beside the job",
        )
        return None
    parts = rel.split("/")
    refused = loose_paths(rel) if loose_paths is not None else None
    if refused is not None:
        c.add(
            "path_escape",
            field,
            f"{field}: {raw!r} {refused}; a loose job may take only loose files of the inbox or "
            "files of a media folder (a plain folder without job.json)",
        )
        return None
    suffix = PurePosixPath(rel).suffix.lower()
    if suffix not in extensions:
        c.add(
            "bad_extension",
            field,
            f"{field}: {raw!r} has extension {suffix or '(none)'!r}; expected one of {', '.join(extensions)}",
        )
        return None
    current = Path(base_dir)
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            c.add("missing_file", field, f"{field}: file {rel!r} not found beside the job")
            return None
        except ValueError as e:  # e.g. a character the OS cannot take in a path
            c.add("bad_value", field, f"{field}: {rel!r} cannot name a file: {e}")
            return None
        except OSError as e:
            if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                c.add("bad_value", field, f"{field}: {rel!r} cannot name a file: {e.strerror}")
            else:
                c.add("missing_file", field, f"{field}: cannot read {rel!r}: {e.strerror}")
            return None
        if stat.S_ISLNK(st.st_mode):
            c.add(
                "symlink",
                field,
                f"{field}: {rel!r} is (or passes through) a symbolic link, which is not allowed",
            )
            return None
    if not stat.S_ISREG(st.st_mode):
        c.add("not_a_file", field, f"{field}: {rel!r} is {describe_mode(st.st_mode)}, not a regular file")
        return None
    if st.st_size == 0:
        c.add("empty_file", field, f"{field}: {rel!r} is empty")
        return None
    if st.st_size > max_bytes:
        c.add("too_large", field, f"{field}: {rel!r} is {st.st_size} bytes, over the limit of {max_bytes}")
        return None
    return rel


def _parse_audio(
    doc: dict[str, Any],
    base_dir: Path,
    defaults: JobDefaults,
    c: _Collector,
    *,
    loose_paths: LoosePathRule | None = None,
) -> tuple[tuple[str, str], ...]:
    if "cond_audio" not in doc:
        c.add("missing_field", "cond_audio", 'cond_audio is required, e.g. {"person1": "voice.wav"}')
        return ()
    value = doc["cond_audio"]
    if not isinstance(value, dict) or not value:
        c.add(
            "bad_type",
            "cond_audio",
            f'cond_audio must be an object like {{"person1": "voice.wav"}}, got {value!r}',
        )
        return ()
    extra = sorted(set(value) - set(PERSONS))
    if extra:
        c.add(
            "bad_value", "cond_audio", f"cond_audio keys must be person1 and optionally person2, got {extra}"
        )
        return ()
    if "person1" not in value:
        c.add("missing_field", "cond_audio.person1", "cond_audio.person1 is required")
        return ()
    if list(value.values()).count(SILENT) and (len(value) != 2 or list(value.values()).count(SILENT) != 1):
        c.add(
            "bad_value",
            "cond_audio",
            f'"{SILENT}" (a silent speaker) is only allowed for one of two speakers, got {value!r}',
        )
        return ()
    out = []
    for person in PERSONS:
        if person in value and value[person] == SILENT:
            out.append((person, SILENT))
        elif person in value:
            rel = check_media_path(
                value[person],
                base_dir=base_dir,
                field=f"cond_audio.{person}",
                extensions=SPEECH_EXTENSIONS,
                max_bytes=defaults.max_media_bytes,
                c=c,
                loose_paths=loose_paths,
            )
            out.append((person, rel or ""))
    return tuple(out)


def _parse_bbox(doc: dict[str, Any], persons: tuple[str, ...], c: _Collector) -> tuple[Any, ...] | None:
    if doc.get("bbox") is None:
        return None
    value = doc["bbox"]
    if not isinstance(value, dict):
        c.add(
            "bad_type",
            "bbox",
            f'bbox must be an object like {{"person1": [r0, c0, r1, c1], ...}}, got {value!r}',
        )
        return None
    if set(value) != set(persons):
        c.add(
            "bad_value",
            "bbox",
            f"bbox must have one box per speaker ({', '.join(persons)}), got {sorted(value)}",
        )
        return None
    boxes = []
    for person in persons:
        box = value[person]
        key = f"bbox.{person}"
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            c.add(
                "bad_type", key, f"{key} must be 4 numbers [row_min, col_min, row_max, col_max], got {box!r}"
            )
            return None
        r0, c0, r1, c1 = (float(v) for v in box)
        if min(r0, c0) < 0 or r1 <= r0 or c1 <= c0:
            c.add(
                "bad_value",
                key,
                f"{key} must satisfy 0 <= row_min < row_max and 0 <= col_min < col_max, got {box}",
            )
            return None
        boxes.append((r0, c0, r1, c1))
    return tuple(boxes)


def _parse_checksums(
    doc: dict[str, Any], declared: tuple[str, ...], media: tuple[str, ...], c: _Collector
) -> tuple[tuple[str, str], ...]:
    """`checksums`: each name must be one of the job's own media paths exactly as the job names
    them (`declared`, normalised the same way); a name that is not ("../face.png", "x.png") is a
    `bad_value` at once. A declared file that is not there yet is reported by its own field."""
    if doc.get("checksums") is None:
        return ()
    value = doc["checksums"]
    if not isinstance(value, dict):
        c.add("bad_type", "checksums", f'checksums must be an object {{"file": "<sha256>"}}, got {value!r}')
        return ()
    out = []
    for name, digest in value.items():
        key = f"checksums.{name}"
        norm = normalise_media_path(name) if isinstance(name, str) and not _bad_path_text(name) else None
        if norm is None or norm not in declared:
            c.add(
                "bad_value",
                key,
                f"checksums names {name!r}, which is not one of the job's files {list(declared)}",
            )
            continue
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or any(ch not in "0123456789abcdefABCDEF" for ch in digest)
        ):
            c.add("bad_value", key, f"{key} must be a sha256 hex digest (64 hex digits), got {digest!r}")
            continue
        if norm in media:
            out.append((norm, digest.lower()))
    return tuple(sorted(out))


def _declared_media(doc: dict[str, Any]) -> tuple[str, ...]:
    """The media paths the job names (normalised; present or not, valid or not)."""
    raw: list[Any] = [doc.get("cond_video")]
    audio = doc.get("cond_audio")
    if isinstance(audio, dict):
        raw += [v for v in audio.values() if v != SILENT]
    names = [normalise_media_path(v) for v in raw if isinstance(v, str) and not _bad_path_text(v)]
    return tuple(n for n in names if n)


def _load_document(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidJob.single("bad_json", f"job file is not UTF-8 text: {e}") from e
    if json_too_deep(text):
        raise InvalidJob.single(
            "bad_json", f"job file nests arrays/objects more than {MAX_JSON_DEPTH} levels deep"
        )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidJob.single(
            "bad_json", f"job file is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except RecursionError as e:  # e.g. 100,000 nested brackets: a bad job, never a crashed daemon
        raise InvalidJob.single(
            "bad_json", "job file is not valid JSON: its arrays/objects are nested too deeply"
        ) from e
    if not isinstance(doc, dict):
        raise InvalidJob.single("bad_json", f"job file must hold a JSON object, got {type(doc).__name__}")
    try:  # a "\udcff" escape decodes to a lone surrogate: no file name or prompt can hold it
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidJob.single(
            "bad_json",
            f"job file holds an unpaired surrogate escape "
            f"({e.object[e.start : e.end].encode('unicode_escape').decode()}): "
            "not valid Unicode text",
        ) from e
    return doc


def parse_job(
    raw: bytes,
    *,
    base_dir: Path,
    defaults: JobDefaults | None = None,
    loose_paths: LoosePathRule | None = None,
) -> JobSpec:
    """Validate a job JSON whose media lie under `base_dir`; raise `InvalidJob` listing every error.
    `loose_paths`: a loose job of the inbox, whose every media path this rule must accept
    (`daemon.inbox.loose_path_problem`; a refused path is `path_escape`)."""
    defaults = defaults or JobDefaults()
    doc = _load_document(raw)
    c = _Collector()

    for key in sorted(set(doc) - KNOWN_KEYS):
        hint = " (text-to-speech jobs are not supported; give cond_audio files)" if key == "tts_audio" else ""
        c.add("unknown_key", key, f"unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(KNOWN_KEYS))}")

    prompt = doc.get("prompt")
    if "prompt" not in doc:
        c.add("missing_field", "prompt", "prompt is required (a sentence describing the video)")
    elif not isinstance(prompt, str):
        c.add("bad_type", "prompt", f"prompt must be a string, got {prompt!r}")
    negative = doc.get("negative_prompt", defaults.negative_prompt)
    if not isinstance(negative, str):
        c.add("bad_type", "negative_prompt", f"negative_prompt must be a string, got {negative!r}")

    cond_video = None
    if "cond_video" not in doc:
        c.add("missing_field", "cond_video", "cond_video is required (the reference image or video)")
    else:
        cond_video = check_media_path(
            doc["cond_video"],
            base_dir=base_dir,
            field="cond_video",
            extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS,
            max_bytes=defaults.max_media_bytes,
            c=c,
            loose_paths=loose_paths,
        )
    audio = _parse_audio(doc, base_dir, defaults, c, loose_paths=loose_paths)
    persons = tuple(p for p, _ in audio)
    audio_type = _get_choice(doc, "audio_type", defaults.audio_type, AUDIO_TYPES, c)
    # one speaker: the reference ignores bbox (its own example jobs carry one), and so do we
    bbox = _parse_bbox(doc, persons, c) if len(persons) == 2 else None

    size = _get_choice(doc, "size", defaults.size, SIZES, c)
    mode = _get_choice(doc, "mode", defaults.mode, MODES, c)
    steps = _get_int(doc, "sample_steps", defaults.sample_steps, 1, MAX_STEPS, c)
    shift = _get_float(doc, "sample_shift", defaults.sample_shift, 1e-3, 1000.0, c)
    if doc.get("sample_shift", 0) is None:
        shift = defaults.sample_shift
    text_scale = _get_float(doc, "sample_text_guide_scale", defaults.sample_text_guide_scale, 0.0, 100.0, c)
    audio_scale = _get_float(
        doc, "sample_audio_guide_scale", defaults.sample_audio_guide_scale, 0.0, 100.0, c
    )
    motion = _get_int(doc, "motion_frame", defaults.motion_frame, 1, 77, c)
    if motion is not None and (motion - 1) % 4:
        c.add("bad_value", "motion_frame", f"motion_frame must be 4n+1 (1, 5, 9, 13, ...), got {motion}")
    max_frames = defaults.max_frame_num
    if doc.get("max_frame_num") is not None:
        max_frames = _get_int(doc, "max_frame_num", defaults.max_frame_num, 1, 10**8, c)
    strength = _get_float(doc, "color_correction_strength", defaults.color_correction_strength, 0.0, 1.0, c)
    use_apg = _get_bool(doc, "use_apg", defaults.use_apg, c)
    apg_momentum = _get_float(doc, "apg_momentum", defaults.apg_momentum, -1.0, 1.0, c)
    apg_threshold = _get_float(doc, "apg_norm_threshold", defaults.apg_norm_threshold, 0.0, 1e6, c)
    noise = _get_choice(doc, "noise", defaults.noise, NOISE_MODES, c)
    rerender = _get_bool(doc, "rerender", False, c)
    priority = _get_int(doc, "priority", defaults.priority, -(10**6), 10**6, c)
    if doc.get("seed") is not None:
        seed, seed_drawn = _get_int(doc, "seed", 0, 0, SEED_LIMIT - 1, c), False
    elif defaults.seed is not None:
        seed, seed_drawn = defaults.seed, False
    else:
        seed, seed_drawn = secrets.randbelow(SEED_LIMIT), True
    checksums = _parse_checksums(
        doc, _declared_media(doc), tuple(p for p in (cond_video, *(p for _, p in audio)) if p), c
    )

    if c.errors:
        raise InvalidJob(c.errors)
    if shift is None:
        shift = SHIFT_BY_SIZE[size]
    return JobSpec(
        prompt=str(prompt),
        negative_prompt=str(negative),
        cond_video=str(cond_video),
        cond_audio=audio,
        audio_type=audio_type,
        bbox=bbox,
        size=size,
        sample_steps=int(steps or 0),
        sample_shift=float(shift),
        sample_text_guide_scale=float(text_scale or 0.0),
        sample_audio_guide_scale=float(audio_scale or 0.0),
        seed=int(seed or 0),
        seed_drawn=seed_drawn,
        mode=mode,
        motion_frame=int(motion or 0),
        max_frame_num=max_frames,
        color_correction_strength=float(strength if strength is not None else 1.0),
        priority=int(priority or 0),
        checksums=checksums,
        use_apg=use_apg,
        apg_momentum=float(apg_momentum if apg_momentum is not None else defaults.apg_momentum),
        apg_norm_threshold=float(apg_threshold if apg_threshold is not None else defaults.apg_norm_threshold),
        noise=noise,
        rerender=rerender,
    )


def load_job(path: Path, *, base_dir: Path | None = None, defaults: JobDefaults | None = None) -> JobSpec:
    """Parse a job file: a bundle's `job.json` (media beside it) or a loose `<name>.json`."""
    path = Path(path)
    try:
        raw = read_regular(path, max_bytes=MAX_JOB_FILE_BYTES)
    except OSError as e:
        raise InvalidJob.single(
            "missing_file", f"cannot read job file {str(path)!r}: {e.strerror or e}"
        ) from e
    return parse_job(raw, base_dir=base_dir or path.parent, defaults=defaults)


def sha256_file(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a regular file, opened with `open_regular` (no final symlink, no FIFO)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def checksum_mismatches(spec: JobSpec, base_dir: Path) -> list[str]:
    """The job's files whose sha256 differs from `checksums` (or that are missing); [] = complete."""
    bad = []
    for name, expected in spec.checksums:
        try:
            if sha256_file(Path(base_dir) / name) != expected:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad
