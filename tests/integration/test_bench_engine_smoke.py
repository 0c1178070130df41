"""The engine benchmark's smoke mode runs end to end, so `ops/bench/engine.py` never rots.

Behaviour only, never timing: every side must finish, report a positive rate and generate
exactly the workload's useful output tokens (the benchmark itself also fails loudly on a
mismatch)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "engine": "| engine: `LLM.generate`",
    "hf-batch8": "| transformers `generate()`, static batches of 8",
    "hf-all": "| transformers `generate()`, one batch of all",
}


def _number(cell: str) -> float:
    return float(cell.strip().replace(",", "").rstrip("x"))


def test_engine_benchmark_smoke(tiny_ckpt: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.bench.engine", "--smoke", "--ckpt-dir", str(tiny_ckpt)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    m = re.search(r"\(([\d,]+) useful output tokens in all\)", out)
    assert m, f"no workload line in:\n{out}"
    expected = int(m.group(1).replace(",", ""))
    assert expected > 0
    for side, prefix in ROWS.items():
        rows = [line for line in out.splitlines() if line.startswith(prefix)]
        assert len(rows) == 1, f"{side}: expected one table row starting {prefix!r} in:\n{out}"
        cells = rows[0].strip().strip("|").split("|")
        rate, useful_computed = _number(cells[1]), cells[4]
        assert rate > 0, f"{side}: tokens/s is {rate}"
        useful, computed = (int(x.strip().replace(",", "")) for x in useful_computed.split("/"))
        assert useful == expected, f"{side}: {useful} useful output tokens, the workload asks for {expected}"
        assert computed >= useful
    assert "Batch-1 latency" in out
    assert "Goal: 3x the better reference" in out
