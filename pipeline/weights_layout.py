"""What is in a weights folder, answered once (standard library only: the daemon imports it).

A weights folder holds a model when it has either
- the released layout: `Wan2.1-I2V-14B-480P/config.json` (`FULL_MARKER`) beside the other files
  (`infinitetalk weights check` says whether they are all there), or
- a tiny random-weight test model written by `infinitetalk weights tiny` (or `write_tiny_once`),
  marked by `tiny.json` (`TINY_MARKER`), which gives every hyper-parameter.

`pipeline.config.load_model_config` reads the shapes from the same two files; the daemon's
weights guard (daemon/weights_guard.py), the render worker, `infinitetalk render` and the GPU
group ask `has_weights` / `is_tiny` here, and write the tiny model with `write_tiny_once`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: sub-folder of the weights dir holding the Wan base model
WAN_DIR = "Wan2.1-I2V-14B-480P"
#: the file a tiny model carries (its hyper-parameters)
TINY_MARKER = "tiny.json"
#: the file of the released layout that says "full-size weights are here"
FULL_MARKER = Path(WAN_DIR) / "config.json"


def is_tiny(folder: Path) -> bool:
    """The folder holds a tiny random-weight model."""
    return (Path(folder) / TINY_MARKER).is_file()


def has_weights(folder: Path) -> bool:
    """The folder holds a model: the released layout or one written by `weights tiny`."""
    return is_tiny(folder) or (Path(folder) / FULL_MARKER).is_file()


def write_tiny_once(folder: Path, seed: int = 0) -> bool:
    """Write tiny random weights into `folder` unless it holds a model already (via a temporary
    sibling, then a rename: a crash never leaves half a model); True when it wrote them."""
    folder = Path(folder)
    if has_weights(folder):
        return False
    from pipeline.tiny import write_tiny_weights

    tmp = folder.with_name(f".{folder.name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tiny_weights(tmp, seed=seed)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return True
