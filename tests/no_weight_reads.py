"""Runs `moe-cluster ARGS...` with every way to weight bytes shut, then reports what it started.

    python -m tests.no_weight_reads check --model DIR

- Python-level opens of a `.safetensors` file may read its header, nothing past it (the first 8
  bytes give the header's length); a read past it raises `WeightBytesRead`.
- `safetensors.safe_open` and `safetensors.torch.load_file` / `load` (memory maps, outside Python's
  file objects) raise `WeightBytesRead` whenever called.

The last line on stdout is JSON: the command's exit status, whether Ray was imported at all and
whether it was initialized. A weight read ends in a traceback instead (exit status 1).
"""

from __future__ import annotations

import builtins
import io
import json
import sys
from typing import Any

_real_open = io.open


class WeightBytesRead(RuntimeError):
    pass


class _HeaderOnly:
    """A binary file object that reads a safetensors header and nothing after it."""

    def __init__(self, f: Any, path: str) -> None:
        self._f, self._path = f, path
        with _real_open(path, "rb") as g:
            self._limit = 8 + int.from_bytes(g.read(8), "little")

    def read(self, n: int | None = -1) -> bytes:
        pos = self._f.tell()
        if n is None or n < 0 or pos + n > self._limit:
            raise WeightBytesRead(f"read of {self._path} past its header ({pos} + {n} > {self._limit} bytes)")
        return self._f.read(n)

    def readinto(self, buffer: Any) -> int:
        raise WeightBytesRead(f"readinto on {self._path}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _HeaderOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    f = _real_open(file, mode, *args, **kwargs)
    if isinstance(file, str | bytes) or hasattr(file, "__fspath__"):
        path = str(file.__fspath__() if hasattr(file, "__fspath__") else file)
        if path.endswith(".safetensors") and "r" in mode:
            return _HeaderOnly(f, path)
    return f


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise WeightBytesRead(f"safetensors opened for tensors: {args[:1]}")


def install() -> None:
    import safetensors
    import safetensors.torch

    builtins.open = io.open = _open
    safetensors.safe_open = _refuse
    safetensors.torch.safe_open = _refuse
    safetensors.torch.load_file = _refuse
    safetensors.torch.load = _refuse


def main(argv: list[str]) -> None:
    install()
    from deployments.cli import main as cli

    try:
        rc = cli(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    ray = sys.modules.get("ray")
    started = bool(ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized())
    print(json.dumps({"rc": rc, "ray_imported": ray is not None, "ray_initialized": started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
