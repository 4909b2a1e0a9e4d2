"""Job files: parse and validate a job JSON into a `JobSpec`, then turn it into a render request.

A job keeps the reference model's JSON format (CONTRACT.md section 4), so the reference's own
example files work unchanged:

    {"prompt": "...", "cond_video": "face.png", "cond_audio": {"person1": "voice.wav"}}

plus `checksums` and the scalar settings under the reference CLI's names (`size`,
`sample_steps`, `seed`, ...): one row each of `SETTINGS`, the table that drives their parsing,
`JobDefaults` (filled by the daemon's `[defaults]`), `JobSpec`, the render request, the dedupe
key and the docs (see "HOW TO ADD A SCALAR JOB KEY" below). A missing seed is drawn here and
recorded in the spec, so every render can be repeated. Instead of speech files a job may give
text, `tts_audio` (the reference's TTS format; its rules are in pipeline/tts_text.py).

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
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pipeline.presets import LIGHTX2V_4STEP, RECIPES, SHIFT_BY_SIZE
from pipeline.tts_text import LANG_CODES, TTS_KEYS, VOICE_KEYS, TtsRequest, text_problem, voice_name
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
#: where a text-to-speech job's voiced speech is kept, under the job's folder: `.tts/<key>/person1.wav`
#: (24 kHz WAV per speaker; `TtsRequest.key` names what was voiced)
TTS_FOLDER = ".tts"
# the reference's marker for a silent speaker in a two-speaker job (zeros as long as the other's speech)
SILENT = "None"
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

# ---------------------------------------------------------------------------------------------
# the settings table
#
# HOW TO ADD A SCALAR JOB KEY (a number, a bool or a string of choices): add ONE `Setting` row to
# `SETTINGS` below (its `since` = SPEC_VERSION + 1, so specs stored before it load with the
# default), then write the code that uses it (a `GenerationRequest` field named by `request=`,
# read in the pipeline; or daemon code for a daemon-only key), then regenerate the two docs:
#     .venv/bin/python -m daemon.config > docs/configuration.md
#     .venv/bin/python -m daemon.jobs_doc          (the table in docs/job-format.md)
# Everything else follows from the row: the job's parsing and its errors, `KNOWN_KEYS`,
# `JobDefaults`, `JobSpec`'s field, `to_dict`/`from_dict`, `to_request`, the `[defaults]` TOML
# key and its checks (daemon/config.py), the dedupe key (`dedupe="when_on"` keeps the keys of
# older jobs unchanged) and both docs. A structured key (a path, an object) keeps a hand-written
# parser in `parse_job` and a field of its own in `JobSpec`.

Dedupe = Literal["always", "never", "when_on"]


def _four_n_plus_one(value: Any) -> str | None:
    """4n+1"""
    return None if (value - 1) % 4 == 0 else f"motion_frame must be 4n+1 (1, 5, 9, 13, ...), got {value}"


@dataclass(frozen=True, slots=True)
class Setting:
    """One scalar job setting: what a job may give, what it defaults to, and where it goes.

    `kind` is int, float, bool or str; an int or float must lie in `lo..hi`, a str in `choices`
    (no choices: any string). `optional`: null in a job means the default (as if left out) and ""
    in the TOML leaves the default unset; `unset` says what an unset value becomes. `request`: the
    `GenerationRequest` field it fills (None: daemon-only, e.g. priority). `dedupe`: how it
    enters the dedupe key: always, never, or when_on (only while `switch`, a bool setting, is
    true; without a switch, while the value is not `default`), so a key added later leaves the
    keys of older jobs as they were. `since`: the spec version that added it (stored specs of
    older versions lack it and load with `default`). `config`: the `[defaults]` table may set it.
    `check`: a further rule on the value (its docstring names the rule in the docs). `unset`:
    the spec's value for an unset one, from the other values (None: it stays None)."""

    name: str
    kind: type
    default: Any
    doc: str
    _: KW_ONLY
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    request: str | None = None
    dedupe: Dedupe = "always"
    switch: str | None = None
    since: int = 0
    config: bool = True
    check: Callable[[Any], str | None] | None = None
    unset: Callable[[Mapping[str, Any]], Any] | None = None

    def read(self, value: Any, c: _Collector) -> Any:
        """`value` (a job's) checked and converted; on a problem, one error naming the value is
        added to `c` and None is returned."""
        key, problem = self.name, None
        if self.kind is bool:
            if not isinstance(value, bool):
                problem = "bad_type", f"{key} must be true or false, got {value!r}"
        elif self.kind is int:
            value = int(value) if isinstance(value, float) and value.is_integer() else value
            if not _is_int(value):
                problem = "bad_type", f"{key} must be an integer, got {value!r}"
            elif not self.lo <= value <= self.hi:
                problem = "bad_value", f"{key} must be between {self.lo} and {self.hi}, got {value}"
        elif self.kind is float:
            if not _is_number(value):
                problem = "bad_type", f"{key} must be a number, got {value!r}"
            elif not self.lo <= value <= self.hi:
                problem = "bad_value", f"{key} must be between {self.lo:g} and {self.hi:g}, got {value!r}"
            else:
                value = float(value)
        elif self.choices and value not in self.choices:
            problem = "bad_value", f"{key} must be one of {', '.join(self.choices)}, got {value!r}"
        elif not isinstance(value, str):
            problem = "bad_type", f"{key} must be a string, got {value!r}"
        if problem is None and self.check is not None and (why := self.check(value)):
            problem = "bad_value", why
        if problem is not None:
            c.add(problem[0], key, problem[1])
            return None
        return value

    def in_dedupe_key(self, values: Mapping[str, Any]) -> bool:
        """Whether this setting, with the job's `values`, enters the job's dedupe key."""
        if self.dedupe == "when_on":
            return bool(values[self.switch]) if self.switch else values[self.name] != self.default
        return self.dedupe == "always"

    def metadata(self) -> dict[str, Any]:
        """What daemon/config.py reads of a `[defaults]` key (`_f`'s metadata)."""
        meta: dict[str, Any] = {"doc": self.doc, "kind": self.kind, "optional": self.optional}
        meta |= {k: v for k, v in (("lo", self.lo), ("hi", self.hi)) if v is not None}
        meta |= {k: v for k, v in (("choices", self.choices), ("check", self.check)) if v}
        return meta | {"internal": not self.config}


_4STEP = LIGHTX2V_4STEP
#: every scalar job setting, in the order the docs list them
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "size",
        str,
        "infinitetalk-480",
        "resolution bucket; the aspect ratio picks the size (e.g. 16:9 "
        "→ 448×896 / 704×1280); a tiny model has its own small buckets under the same names",
        choices=SIZES,
        request="size",
    ),
    Setting(
        "sample_steps",
        int,
        _4STEP.sample_steps,
        "denoising steps per chunk (4 with the lightx2v LoRA)",
        lo=1,
        hi=MAX_STEPS,
        request="sample_steps",
    ),
    Setting(
        "sample_shift",
        float,
        _4STEP.sample_shift,
        "flow shift; unset: 7 for 480, 11 for 720 (the reference's rule)",
        lo=1e-3,
        hi=1000.0,
        optional=True,
        request="sample_shift",
        unset=lambda v: SHIFT_BY_SIZE[v["size"]],
    ),
    Setting(
        "sample_text_guide_scale",
        float,
        _4STEP.sample_text_guide_scale,
        "text classifier-free guidance (1: off, one DiT pass fewer per step, as with the LoRA)",
        lo=0.0,
        hi=100.0,
        request="sample_text_guide_scale",
    ),
    Setting(
        "sample_audio_guide_scale",
        float,
        _4STEP.sample_audio_guide_scale,
        "audio classifier-free guidance (1: off)",
        lo=0.0,
        hi=100.0,
        request="sample_audio_guide_scale",
    ),
    Setting(
        "mode",
        str,
        "streaming",
        "streaming: the whole audio, in chunks; clip: one chunk (81 frames, "
        "3.24 s), as the reference's clip mode: a longer audio is cut to that chunk (the sidecar's "
        "frames and duration_s say so)",
        choices=MODES,
        request="mode",
    ),
    Setting(
        "motion_frame",
        int,
        9,
        "frames carried over from one chunk into the next",
        lo=1,
        hi=77,
        check=_four_n_plus_one,
        request="motion_frame",
    ),
    Setting(
        "max_frame_num",
        int,
        None,
        "cap on rendered frames; unset: the whole audio, however long",
        lo=1,
        hi=10**8,
        optional=True,
        request="max_frame_num",
    ),
    Setting(
        "color_correction_strength",
        float,
        1.0,
        "colour drift correction between chunks: Lab colour "
        "matching of every chunk to the first reference frame (0: off)",
        lo=0.0,
        hi=1.0,
        request="color_correction_strength",
    ),
    Setting(
        "use_apg",
        bool,
        False,
        "adaptive projected guidance (the reference's --use_apg): tames "
        "over-saturation at high guidance scales, same DiT passes",
        request="use_apg",
        dedupe="when_on",
        since=1,
    ),
    Setting(
        "apg_momentum",
        float,
        -0.75,
        "APG momentum of the guidance differences (the reference's --apg_momentum)",
        lo=-1.0,
        hi=1.0,
        request="apg_momentum",
        dedupe="when_on",
        switch="use_apg",
        since=1,
    ),
    Setting(
        "apg_norm_threshold",
        float,
        55.0,
        "APG cap on a guidance difference's L2 norm (0: no cap; the reference's --apg_norm_threshold)",
        lo=0.0,
        hi=1e6,
        request="apg_norm_threshold",
        dedupe="when_on",
        switch="use_apg",
        since=1,
    ),
    Setting(
        "audio_type",
        str,
        "para",
        "two speakers: para (both tracks at once, the shorter padded with "
        "silence) or add (person 1 speaks, then person 2)",
        choices=AUDIO_TYPES,
        request="audio_type",
    ),
    Setting(
        "negative_prompt",
        str,
        None,
        "what to steer away from (used when sample_text_guide_scale is not "
        "1); unset: the InfiniteTalk default",
        optional=True,
        request="negative_prompt",
        unset=lambda v: DEFAULT_NEGATIVE_PROMPT,
    ),
    Setting(
        "seed",
        int,
        None,
        "seed; unset: drawn at random and recorded in the job's result, so every render can be repeated",
        lo=0,
        hi=SEED_LIMIT - 1,
        optional=True,
        request="seed",
        unset=lambda v: secrets.randbelow(SEED_LIMIT),
    ),
    Setting(
        "noise",
        str,
        "portable",
        "where the noise is drawn: portable (a CPU generator: one seed, one "
        "video on any machine) or reference (on the GPU, as the reference: its video for the seed); "
        "docs/rendering.md",
        choices=NOISE_MODES,
        request="noise",
        since=2,
    ),
    Setting(
        "priority",
        int,
        0,
        "queue priority among waiting jobs (docs/daemon.md gives the ordering rules)",
        lo=-(10**6),
        hi=10**6,
        dedupe="never",
        config=False,
    ),
    Setting(
        "rerender",
        bool,
        False,
        "render again even when an earlier job had the same media and settings "
        "(then rendered as a new job linked to the first, `rerender_of`); without it such a job is "
        "rejected as duplicate",
        dedupe="never",
        since=3,
        config=False,
    ),
    Setting(
        "lang_code",
        str,
        "a",
        "text-to-speech jobs (`tts_audio`): Kokoro's language code, a (American English, the "
        "reference's), b (British English), z (Mandarin), e/f/h/i/p (Spanish, French, Hindi, Italian, "
        "Brazilian Portuguese, through espeak-ng)",
        choices=LANG_CODES,
        dedupe="when_on",
        since=4,
        config=False,
    ),
    Setting(
        "speed",
        float,
        1.0,
        "text-to-speech jobs (`tts_audio`): speaking speed (1: Kokoro's own, the reference's)",
        lo=0.5,
        hi=2.0,
        dedupe="when_on",
        since=4,
        config=False,
    ),
)
#: the newest spec version (a stored spec older than a setting's `since` lacks that setting)
SPEC_VERSION = max(s.since for s in SETTINGS)
SETTING_BY_NAME = {s.name: s for s in SETTINGS}
#: the structured keys, each with a hand-written parser in `parse_job`
STRUCTURED_KEYS = ("prompt", "cond_video", "cond_audio", "tts_audio", "bbox", "checksums")
#: every key a job may carry
KNOWN_KEYS = frozenset(STRUCTURED_KEYS) | frozenset(SETTING_BY_NAME)

_T = TypeVar("_T")


def _with_settings(cls: type[_T]) -> type[_T]:
    """Give the class about to become a dataclass one field per row of `SETTINGS` (its default,
    and `Setting.metadata()` for daemon/config.py)."""
    for s in SETTINGS:
        cls.__annotations__[s.name] = "Any"
        setattr(cls, s.name, field(default=s.default, metadata=s.metadata()))
    return cls


@dataclass(frozen=True, slots=True, kw_only=True)
@_with_settings
class JobDefaults:
    """Settings a job may leave out: one field per row of `SETTINGS` (the daemon's `[defaults]`
    fills them; the table's defaults are the lightx2v 4-step recipe) and the media size limit."""

    max_media_bytes: int = field(default=4 * 1024**3, metadata={"doc": "", "internal": True})

    if TYPE_CHECKING:  # the fields made from SETTINGS, as mypy sees them

        def __init__(self, *, max_media_bytes: int = ..., **settings: Any) -> None: ...
        def __getattr__(self, name: str) -> Any: ...


#: named sets of defaults: the lightx2v 4-step recipe and the reference's base recipe
PRESETS: dict[str, JobDefaults] = {name: JobDefaults(**r.as_dict()) for name, r in RECIPES.items()}


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
_OPTIONAL_SPEC_FIELDS = frozenset(s.name for s in SETTINGS if s.since)


@dataclass(frozen=True, slots=True, kw_only=True)
@_with_settings
class JobSpec:
    """A validated job with every default resolved: exactly what will be rendered. Its fields are
    the structured keys below and one per row of `SETTINGS` (`spec.sample_steps`, ...).

    Media paths are POSIX paths relative to the job's base directory (the bundle directory or
    the inbox). `cond_audio` is one (person, path) pair per speaker, person1 first.
    `tts_audio` (a text-to-speech job, whose `cond_audio` is empty) is its (key, value) pairs in
    `TTS_KEYS` order, each voice as its name; its speech is voiced into `TTS_FOLDER`.
    """

    prompt: str
    cond_video: str
    cond_audio: tuple[tuple[str, str], ...]
    bbox: tuple[tuple[float, float, float, float], ...] | None
    seed_drawn: bool  # True when the job gave no seed and parse_job drew one
    checksums: tuple[tuple[str, str], ...] = field(default=())
    tts_audio: tuple[tuple[str, str], ...] = field(default=())

    if TYPE_CHECKING:  # the fields made from SETTINGS, as mypy sees them

        def __getattr__(self, name: str) -> Any: ...

    @property
    def persons(self) -> tuple[str, ...]:
        """The speakers, person1 first: those of `cond_audio`, or those `tts_audio` voices."""
        if self.tts_audio:
            return PERSONS[: sum(1 for k, _ in self.tts_audio if k in VOICE_KEYS)]
        return tuple(p for p, _ in self.cond_audio)

    @property
    def tts(self) -> TtsRequest | None:
        """What a text-to-speech job voices (None for a job with speech files)."""
        if not self.tts_audio:
            return None
        given = dict(self.tts_audio)
        voices = tuple(given[k] for k in VOICE_KEYS if k in given)
        return TtsRequest(text=given["text"], voices=voices, lang_code=self.lang_code, speed=self.speed)

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
        return len(self.persons)

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as a JSON-able dict in the job format (seed included); what
        the ledger stores as `spec_json` and the outbox JSON reports."""
        out = asdict(self)
        out["cond_audio"] = dict(self.cond_audio)
        out["bbox"] = (
            None if self.bbox is None else {p: list(b) for p, b in zip(self.persons, self.bbox, strict=True)}
        )
        out["checksums"] = dict(self.checksums)
        if self.tts_audio:
            out["tts_audio"] = dict(self.tts_audio)
        else:  # a job with speech files: its spec as before text-to-speech jobs existed
            del out["tts_audio"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec from `to_dict()` output (e.g. the ledger's `spec_json`)."""
        audio = tuple((str(p), str(v)) for p, v in dict(data["cond_audio"]).items())
        tts = dict(data.get("tts_audio") or {})
        tts_audio = tuple((k, str(tts[k])) for k in TTS_KEYS if k in tts)
        persons = (
            PERSONS[: sum(1 for k, _ in tts_audio if k in VOICE_KEYS)] if tts_audio else [p for p, _ in audio]
        )
        bbox_map = data.get("bbox")
        bbox = None if bbox_map is None else tuple(_box4(bbox_map[p]) for p in persons)
        kwargs = {
            k: data[k]
            for k in cls.__dataclass_fields__
            if k not in ("cond_audio", "bbox", "checksums", "tts_audio")
            and (k in data or k not in _OPTIONAL_SPEC_FIELDS)
        }
        return cls(
            **kwargs,
            cond_audio=audio,
            bbox=bbox,
            checksums=tuple(sorted(dict(data.get("checksums") or {}).items())),
            tts_audio=tts_audio,
        )

    def to_request(self, base_dir: Path) -> GenerationRequest:
        """The pipeline's request for this job, media paths made absolute under `base_dir`."""
        base = Path(base_dir).absolute()
        settings = {s.request: getattr(self, s.name) for s in SETTINGS if s.request}
        audio = tuple(None if path == SILENT else base / path for _, path in self.cond_audio)
        if self.tts is not None:  # voiced in the prepare stage into the job's own folder
            folder = base / TTS_FOLDER / self.tts.key(self.seed)
            audio = tuple(folder / f"{p}.wav" for p in self.persons)
            settings["audio_type"] = "para"  # the voiced tracks already take turns, silent in between
        return GenerationRequest(
            prompt=self.prompt,
            cond_media=base / self.cond_video,
            audio=audio,
            bbox=self.bbox,
            tts=self.tts,
            **settings,
        )

    def with_seed(self, seed: int) -> JobSpec:
        changes: dict[str, Any] = {"seed": seed, "seed_drawn": False}
        return replace(self, **changes)


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
    """A finite JSON number; an integer too large for a float (10**400) is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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
    rel = _media_name(raw, field, extensions, c, loose_paths)
    if rel is None or not _media_file_ok(Path(base_dir), rel, field, max_bytes, c):
        return None
    return rel


def _media_name(
    raw: Any, field: str, extensions: tuple[str, ...], c: _Collector, loose_paths: LoosePathRule | None
) -> str | None:
    """The path text's checks (no file system): a string, a nameable path inside the job's folder
    that the loose-path rule takes, with one of `extensions`; normalised, or None."""
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
    return rel


def _media_file_ok(base_dir: Path, rel: str, field: str, max_bytes: int, c: _Collector) -> bool:
    """The file's checks: every part of the path there and no symbolic link, and the file a
    regular, non-empty one of at most `max_bytes`."""
    current = base_dir
    for part in rel.split("/"):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            c.add("missing_file", field, f"{field}: file {rel!r} not found beside the job")
            return False
        except ValueError as e:  # e.g. a character the OS cannot take in a path
            c.add("bad_value", field, f"{field}: {rel!r} cannot name a file: {e}")
            return False
        except OSError as e:
            if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                c.add("bad_value", field, f"{field}: {rel!r} cannot name a file: {e.strerror}")
            else:
                c.add("missing_file", field, f"{field}: cannot read {rel!r}: {e.strerror}")
            return False
        if stat.S_ISLNK(st.st_mode):
            c.add(
                "symlink",
                field,
                f"{field}: {rel!r} is (or passes through) a symbolic link, which is not allowed",
            )
            return False
    if not stat.S_ISREG(st.st_mode):
        c.add("not_a_file", field, f"{field}: {rel!r} is {describe_mode(st.st_mode)}, not a regular file")
    elif st.st_size == 0:
        c.add("empty_file", field, f"{field}: {rel!r} is empty")
    elif st.st_size > max_bytes:
        c.add("too_large", field, f"{field}: {rel!r} is {st.st_size} bytes, over the limit of {max_bytes}")
    else:
        return True
    return False


#: `check_media_path` with the job's folder, size limit, collector and loose-path rule bound
MediaCheck = Callable[..., "str | None"]


def _parse_audio(doc: dict[str, Any], media: MediaCheck, c: _Collector) -> tuple[tuple[str, str], ...]:
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
            rel = media(value[person], field=f"cond_audio.{person}", extensions=SPEECH_EXTENSIONS)
            out.append((person, rel or ""))
    return tuple(out)


def _parse_tts(doc: dict[str, Any], c: _Collector) -> tuple[tuple[str, str], ...]:
    """`tts_audio`: the text and a voice per speaker (pipeline/tts_text.py has the rules); its
    speech replaces `cond_audio`, which may be absent or empty ({}) but names no speech file."""
    value = doc["tts_audio"]
    example = '{"text": "Hello.", "human1_voice": "af_heart"}'
    if not isinstance(value, dict):
        c.add("bad_type", "tts_audio", f"tts_audio must be an object like {example}, got {value!r}")
        return ()
    if extra := sorted(set(value) - set(TTS_KEYS)):
        c.add("bad_value", "tts_audio", f"tts_audio keys are {', '.join(TTS_KEYS)}, got {extra}")
    cond = doc.get("cond_audio") or {}
    for person in cond if isinstance(cond, dict) else ["person1"]:
        c.add(
            "bad_value",
            f"cond_audio.{person}",
            f"cond_audio.{person} gives a speech file and tts_audio voices the speech: give one of the "
            "two (a text-to-speech job leaves cond_audio out or empty)",
        )
    out: list[tuple[str, str]] = []
    for key in VOICE_KEYS:
        raw = value.get(key)
        name = voice_name(raw) if isinstance(raw, str) else None
        if raw is None and key == "human1_voice":
            c.add(
                "missing_field",
                "tts_audio.human1_voice",
                f"tts_audio.human1_voice is required, e.g. {example}",
            )
        elif raw is not None and name is None:
            c.add(
                "bad_value",
                f"tts_audio.{key}",
                f"tts_audio.{key} must name a Kokoro voice, e.g. af_heart or "
                f"weights/Kokoro-82M/voices/af_heart.pt, got {raw!r}",
            )
        elif name is not None:
            out.append((key, name))
    text = value.get("text")
    if not isinstance(text, str):
        c.add(
            "missing_field" if text is None else "bad_type",
            "tts_audio.text",
            "tts_audio.text must be a string",
        )
    elif (why := text_problem(text, len(out))) is not None:
        c.add("bad_value", "tts_audio.text", f"tts_audio.text: {why}")
    return (("text", text), *out) if isinstance(text, str) and out else ()


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
        c.add("unknown_key", key, f"unknown key {key!r}; allowed keys: {', '.join(sorted(KNOWN_KEYS))}")

    prompt = doc.get("prompt")
    if "prompt" not in doc:
        c.add("missing_field", "prompt", "prompt is required (a sentence describing the video)")
    elif not isinstance(prompt, str):
        c.add("bad_type", "prompt", f"prompt must be a string, got {prompt!r}")

    media: MediaCheck = partial(
        check_media_path, base_dir=base_dir, max_bytes=defaults.max_media_bytes, c=c, loose_paths=loose_paths
    )
    cond_video = None
    if "cond_video" not in doc:
        c.add("missing_field", "cond_video", "cond_video is required (the reference image or video)")
    else:
        cond_video = media(
            doc["cond_video"], field="cond_video", extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
        )
    tts = _parse_tts(doc, c) if "tts_audio" in doc else ()
    audio = () if "tts_audio" in doc else _parse_audio(doc, media, c)
    persons = PERSONS[: sum(k in VOICE_KEYS for k, _ in tts)] if tts else tuple(p for p, _ in audio)
    # one speaker: the reference ignores bbox (its own example jobs carry one), and so do we
    bbox = _parse_bbox(doc, persons, c) if len(persons) == 2 else None
    values = _parse_settings(doc, defaults, c)
    checksums = _parse_checksums(
        doc, _declared_media(doc), tuple(p for p in (cond_video, *(p for _, p in audio)) if p), c
    )

    if c.errors:
        raise InvalidJob(c.errors)
    seed_drawn = values["seed"] is None
    for s in SETTINGS:
        if values[s.name] is None and s.unset is not None:
            values[s.name] = s.unset(values)
    return JobSpec(
        prompt=str(prompt),
        cond_video=str(cond_video),
        cond_audio=audio,
        bbox=bbox,
        seed_drawn=seed_drawn,
        checksums=checksums,
        tts_audio=tts,
        **values,
    )


def _parse_settings(doc: dict[str, Any], defaults: JobDefaults, c: _Collector) -> dict[str, Any]:
    """Every row of `SETTINGS`: the job's value (checked) or, when it gives none or null for an
    optional one, the default; then the row's further `check`, whichever gave the value."""
    values: dict[str, Any] = {}
    for s in SETTINGS:
        given = s.name in doc and not (s.optional and doc[s.name] is None)
        value = s.read(doc[s.name], c) if given else getattr(defaults, s.name)
        if value is not None and s.kind is float:
            value = float(value)
        if value is not None and s.check is not None and (why := s.check(value)):
            c.add("bad_value", s.name, why)
        values[s.name] = value
    return values


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
