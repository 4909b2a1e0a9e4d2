"""Which `WorkerPool` the daemon renders with: `[cluster] executor` (docs/scaling.md).

`local` (the default) is `daemon.pool.LocalPool`, one worker process per device of this host;
`ray` is `daemon.ray_pool.RayPool`, one Ray actor per GPU of a Ray cluster. Ray is imported only
for `ray`: a default install neither needs nor loads it.
"""

from __future__ import annotations

import threading

from daemon.config import Settings
from daemon.pool import LocalPool, WorkerPool
from daemon.runner import WorkerConfig

#: sysexits: `ray` asked for but not installed (a config the install cannot run)
EX_CONFIG = 78
#: sysexits: the Ray cluster cannot be reached
EX_UNAVAILABLE = 69


class ClusterError(RuntimeError):
    """The executor cannot start; `exit_code` is the daemon's exit status for it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def make_pool(
    settings: Settings, devices: list[str], config: WorkerConfig, wake: threading.Event
) -> WorkerPool:
    """The render workers `[cluster] executor` names (not started yet)."""
    if settings.cluster.executor == "local":
        return LocalPool(settings, devices, config, wake)
    try:
        from daemon.ray_pool import RayPool  # the one module that imports ray
    except ImportError as e:
        if not (e.name or "ray").partition(".")[0] == "ray":
            raise
        raise ClusterError(
            f'[cluster] executor = "ray" needs the ray package, which cannot be imported ({e}); '
            "install the extra (pip install '.[ray]') or set executor = \"local\"",
            EX_CONFIG,
        ) from e
    return RayPool(settings, config, wake)
