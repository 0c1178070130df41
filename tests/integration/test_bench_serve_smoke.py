"""The serving benchmark's smoke mode runs end to end, so `ops/bench/serve.py` never rots.

Behaviour only, never timing: every path at every concurrency reports positive rates, the goal
lines are written, and the interference section has gaps on both sides. It starts its own Ray
cluster in a child process (never the session's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # its own Ray cluster and Serve, in a child process


def test_serve_benchmark_smoke(tiny_ckpt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's cluster
    proc = subprocess.run([sys.executable, "-m", "ops.bench.serve", "--smoke", "--ckpt-dir", str(tiny_ckpt),
                           "--target-step-ms", "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    for c in (1, 4):
        for path in ("handle", "http", "grpc"):
            rows = [line for line in out.splitlines() if line.startswith(f"| {c} | {path} | ")]
            assert len(rows) == 2, f"c={c} {path}: expected a latency row and a CPU row in:\n{out}"
            cells = [cell.strip() for cell in rows[0].strip().strip("|").split("|")]
            assert float(cells[2].replace(",", "")) > 0 and float(cells[3].replace(",", "")) > 0, rows[0]
            assert cells[4].endswith("x") and all(cells[i] != "-" for i in range(5, 9)), rows[0]
    assert re.search(r"Goal: HTTP output tokens/s at concurrency 4 at least 0.8x the direct handle: \*\*[\d.]+x", out)
    gaps = re.findall(r"^\| (before|during the long prefill) \| (\d+) \|", out, re.M)
    assert [g[0] for g in gaps] == ["before", "during the long prefill"] and all(int(n) > 0 for _, n in gaps), out
    assert re.search(r"Goals: the long prompt at most doubles the others' inter-token p99: \*\*[\d.]+x, \w+\*\*; its "
                     r"time to first token within 1.5x of running alone: \*\*[\d.]+x", out)
    assert re.search(r"^\| alone \| [\d.]+ \|$", out, re.M) and "`target_step_ms` 50" in out
