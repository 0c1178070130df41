"""Bearer-key checks shared by the HTTP middleware and the gRPC methods."""

from __future__ import annotations

import hmac
from collections.abc import Sequence


def key_matches(header: str | None, api_keys: Sequence[str]) -> bool:
    """`header` is an `Authorization` value; no configured keys means no authentication."""
    if not api_keys:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode()
    # Compare against every key so the time taken does not tell which one nearly matched.
    return any([hmac.compare_digest(given, k.encode()) for k in api_keys])
