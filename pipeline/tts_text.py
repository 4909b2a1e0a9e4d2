"""The rules of a text-to-speech job (`tts_audio`), in the standard library only: the daemon checks
a job with them at intake without loading torch or the kokoro package (pipeline/tts.py voices it).

A `tts_audio` job gives text and one voice per speaker, as the reference's own TTS mode:

    {"text": "Hello there.", "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}

Two speakers (`human2_voice` too) mark each turn `(s1) ...` or `(s2) ...`; each turn is voiced
in the speaker's voice while the other speaker is silent for as long. A voice is a name
(`af_heart`) or the path of its file as the reference writes it (relative to the weights folder,
optionally under a leading `weights/`, the reference's own folder name): either way
`<weights_dir>/Kokoro-82M/voices/<name>.pt`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: the released model's Hub repository (the kokoro package picks its weights file by this name)
KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_DIR = "Kokoro-82M"
KOKORO_CONFIG = "config.json"
KOKORO_WEIGHTS = "kokoro-v1_0.pth"
VOICES_DIR = "voices"
#: Kokoro's output rate; the voiced speech is kept and muxed at this rate
SAMPLE_RATE = 24000
#: the kokoro pipeline's split of the text into separately voiced pieces (the reference's)
SPLIT_PATTERN = r"\n+"
#: the longest text a job may give, in characters (about five minutes of speech)
MAX_TEXT_CHARS = 5000
#: Kokoro's language codes whose grapheme-to-phoneme step needs nothing from the network: a/b
#: (American/British English: misaki with spaCy's en_core_web_sm, espeak-ng for unknown words), z
#: (Mandarin: misaki's jieba/pypinyin), and e/f/h/i/p (Spanish, French, Hindi, Italian, Brazilian
#: Portuguese: espeak-ng, shipped in the espeakng-loader wheel). Japanese (j) is left out: its
#: dictionary (unidic) is a download of its own.
LANG_CODES = ("a", "b", "e", "f", "h", "i", "p", "z")
VOICE_KEYS = ("human1_voice", "human2_voice")
TTS_KEYS = ("text", *VOICE_KEYS)
_VOICE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: a speaker mark, `(s1)` or `(s2)` (any number is found, so a wrong one can be reported)
_MARK = re.compile(r"\(s(\d+)\)")
#: what each language code needs besides kokoro and misaki: (module, what provides it)
_G2P_MODULES = {
    "a": (
        ("spacy", "the tts extra"),
        ("en_core_web_sm", "scripts/spacy-model"),
        ("espeakng_loader", "the tts extra"),
    ),
    "b": (
        ("spacy", "the tts extra"),
        ("en_core_web_sm", "scripts/spacy-model"),
        ("espeakng_loader", "the tts extra"),
    ),
    "z": (("jieba", "the tts extra"), ("pypinyin", "the tts extra"), ("cn2an", "the tts extra")),
}
_INSTALL = "pip install -e '.[tts]' (scripts/bootstrap installs it)"


@dataclass(frozen=True, slots=True, kw_only=True)
class TtsRequest:
    """What to voice: the text, one voice name per speaker (person1 first), Kokoro's language code
    and speaking speed (1 = as trained)."""

    text: str
    voices: tuple[str, ...]
    lang_code: str = "a"
    speed: float = 1.0

    @property
    def num_speakers(self) -> int:
        return len(self.voices)

    def key(self, seed: int) -> str:
        """What names the voiced files of this request under `seed` (16 hex digits): a changed
        text, voice, language, speed or seed voices anew, never reusing older speech."""
        what = [self.text, list(self.voices), self.lang_code, self.speed, seed]
        return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:16]


class TtsUnavailable(RuntimeError):
    """A piece text-to-speech needs is missing: the message names what to install or download."""


def voice_name(raw: str) -> str | None:
    """The voice a job names: `af_heart`, `af_heart.pt`, `Kokoro-82M/voices/af_heart.pt` or
    `weights/Kokoro-82M/voices/af_heart.pt` all name `af_heart`; None for anything else (another
    folder, `..`, an absolute path)."""
    path = PurePosixPath(raw.strip())
    parts = path.parts
    if parts and parts[0] == "weights":
        parts = parts[1:]
    if len(parts) == 3 and parts[:2] == (KOKORO_DIR, VOICES_DIR) and parts[2].endswith(".pt"):
        name = parts[2][: -len(".pt")]
    elif len(parts) == 1:
        name = parts[0][: -len(".pt")] if parts[0].endswith(".pt") else parts[0]
    else:
        return None
    return name if _VOICE_NAME.match(name) else None


def voice_file(weights_dir: Path, name: str) -> Path:
    return Path(weights_dir) / KOKORO_DIR / VOICES_DIR / f"{name}.pt"


def speaker_turns(text: str) -> tuple[tuple[int, str], ...]:
    """A two-speaker text's turns in order, (speaker 1 or 2, what they say), as the reference
    reads its `(s1)`/`(s2)` marks; ValueError naming the problem for a text without marks, with
    words before the first mark, a mark other than (s1)/(s2), or a turn with nothing to say."""
    marks = list(_MARK.finditer(text))
    if not marks:
        raise ValueError("a two-speaker text marks each turn with (s1) or (s2), e.g. '(s1) Hi. (s2) Hello.'")
    if text[: marks[0].start()].strip():
        raise ValueError(f"text before the first (s1)/(s2) mark: {text[: marks[0].start()].strip()[:40]!r}")
    turns = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        speaker, said = int(mark.group(1)), text[mark.end() : end].strip()
        if speaker not in (1, 2):
            raise ValueError(f"mark {mark.group()!r}: only (s1) and (s2) are speakers")
        if not said:
            raise ValueError(f"turn {i + 1} ({mark.group()}) has nothing to say")
        turns.append((speaker, said))
    return tuple(turns)


def text_problem(text: str, num_speakers: int) -> str | None:
    """Why a job's text cannot be voiced, or None."""
    if not text.strip():
        return "empty: give the words to speak"
    if len(text) > MAX_TEXT_CHARS:
        return f"{len(text)} characters, over the limit of {MAX_TEXT_CHARS}"
    if num_speakers == 2:
        try:
            speaker_turns(text)
        except ValueError as e:
            return str(e)
    return None


def unavailable(weights_dir: Path, request: TtsRequest) -> str | None:
    """What is missing to voice `request` from `weights_dir` (packages, Kokoro's model files), as a
    message naming what to install or download; None when nothing is (see `unknown_voice`)."""
    needs = [
        ("kokoro", "the tts extra"),
        ("misaki", "the tts extra"),
        *_G2P_MODULES.get(request.lang_code, ()),
    ]
    missing = [module for module, _ in needs if importlib.util.find_spec(module) is None]
    if missing:
        how = _INSTALL if "en_core_web_sm" not in missing or len(missing) > 1 else "run scripts/spacy-model"
        return f"text-to-speech needs the Python modules {', '.join(missing)}: {how}"
    kokoro = Path(weights_dir) / KOKORO_DIR
    files = [kokoro / KOKORO_CONFIG, kokoro / KOKORO_WEIGHTS]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        return (
            f"text-to-speech needs {', '.join(absent)}: run `infinitetalk weights download {weights_dir}` "
            "(it fetches hexgrad/Kokoro-82M), or `infinitetalk weights tiny` for the tiny test model"
        )
    return None


def known_voices(weights_dir: Path) -> tuple[str, ...]:
    """The voice names in `weights_dir/Kokoro-82M/voices` (sorted; () when there is none)."""
    folder = Path(weights_dir) / KOKORO_DIR / VOICES_DIR
    return tuple(sorted(p.stem for p in folder.glob("*.pt") if p.is_file())) if folder.is_dir() else ()


def unknown_voice(weights_dir: Path, request: TtsRequest) -> str | None:
    """'tts_audio.human1_voice: ...' for the first voice of `request` without a file, or None."""
    for key, name in zip(VOICE_KEYS, request.voices, strict=False):
        if not voice_file(weights_dir, name).is_file():
            have = known_voices(weights_dir)
            return f"tts_audio.{key}: unknown voice {name!r}; the voices in {Path(weights_dir) / KOKORO_DIR / VOICES_DIR} are {', '.join(have) or 'none'}"
    return None
