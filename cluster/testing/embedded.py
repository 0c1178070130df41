"""The embedded default model: the tiny preset, generated once and cached on disk."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

EMBEDDED_PRESET = "tiny"
EMBEDDED_SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("MOE_CLUSTER_CACHE", Path.home() / ".cache" / "moe-cluster"))


def embedded_checkpoint() -> Path:
    """Path of the embedded tiny checkpoint, writing it first if it is not cached yet."""
    from cluster.testing.checkpoint_writer import METADATA_FILE, make_checkpoint

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{EMBEDDED_PRESET}-seed{EMBEDDED_SEED}"
    with open(root / ".lock", "w") as lock:  # several processes may ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / METADATA_FILE).exists():
            make_checkpoint(target, EMBEDDED_PRESET, seed=EMBEDDED_SEED)
    return target
