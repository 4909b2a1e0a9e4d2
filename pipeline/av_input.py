"""Opening a media file for reading with PyAV, whatever the text encoding of its tags.

A container's tags (title, artist, encoder, comment) are free bytes: files from phones, old
editors and Windows tools carry Latin-1 or UTF-16 ones. PyAV before 19 decodes them as strict
UTF-8 when it opens the file, so such a file raised UnicodeDecodeError before a sample was read,
unless opened with `metadata_errors="ignore"`. PyAV 19 removed that option (passing it is a
TypeError) and decodes tags with `surrogateescape`, which never fails. The product reads no tag,
so every read of an input or of a file it made goes through `open_input`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import IO, Any


@functools.cache
def tags_are_loose() -> bool:
    """Whether the installed PyAV reads and writes tags with surrogateescape (19 and later), rather
    than with the `metadata_errors` a caller gives (strict by default)."""
    import av

    return int(str(av.__version__).split(".")[0]) >= 19


def open_input(src: str | Path | IO[bytes]) -> Any:
    """`av.open(src)` for reading (an `InputContainer`); tags that are not UTF-8 never fail it."""
    import av

    opener: Any = av.open  # its stubs know one PyAV version's options
    options = {} if tags_are_loose() else {"metadata_errors": "ignore"}
    return opener(str(src) if isinstance(src, Path) else src, **options)
