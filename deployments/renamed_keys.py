"""Configuration keys that were renamed: the old names keep working, with a warning logged once per
key and process, so existing config files and manifests go on deploying while they are updated.
Used by the pydantic models at the edge (`AppConfig`, `AutoscalingSettings`) as a `before`
validator."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)
_warned: set[str] = set()
_lock = threading.Lock()


def with_new_names(data: Any, renamed: Mapping[str, str], where: str = "") -> Any:
    """`data` with every deprecated key of `renamed` (old -> new) under its new name. A mapping
    that gives both names is refused (ValueError): which one was meant is unclear. Anything that
    is not a mapping is returned as is (pydantic then reports it)."""
    if not isinstance(data, Mapping) or not any(old in data for old in renamed):
        return data
    out = dict(data)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{where}{old} is the deprecated name of {where}{new}; give only {where}{new}")
        out[new] = out.pop(old)
        _warn_once(f"{where}{old}", f"{where}{new}")
    return out


def _warn_once(old: str, new: str) -> None:
    with _lock:
        if old in _warned:
            return
        _warned.add(old)
    logger.warning("config key %s is deprecated: it is now %s (the old name still works for now)", old, new)
