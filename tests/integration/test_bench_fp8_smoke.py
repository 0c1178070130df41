"""The FP8 benchmark's smoke mode runs end to end, so `ops/bench/fp8.py` never rots.

Behaviour only, never timing: every side reports its shard bytes, the FP8 ones within the issue's
0.30x of the fp32 load, bf16 at half of it, and the decode sides a positive rate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _row(out: str, side: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.startswith(f"| {side} ")]
    assert len(rows) == 1, f"expected one row for {side!r} in:\n{out}"
    return [c.strip() for c in rows[0].strip().strip("|").split("|")]


def test_fp8_benchmark_smoke(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.bench.fp8", "--smoke", "--ckpt-root", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    ratios = {side: float(_row(out, side)[3].rstrip("x")) for side in ("fp32", "bf16", "fp8", "fp8-cache")}
    assert ratios["fp32"] == 1.0 and ratios["bf16"] == 0.5
    assert ratios["fp8"] <= 0.30 and ratios["fp8-cache"] <= 0.30
    for side in ("fp32", "fp8", "fp8-cache"):
        assert float(_row(out, side)[4].replace(",", "")) > 0
    assert _row(out, "fp8")[1] == "float32"
    assert re.search(r"Goal: .* met\.", out) and "generate the same tokens: True" in out
