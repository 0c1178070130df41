"""The output-payload benchmark's smoke mode runs end to end (behaviour only, never timing): the
delta output of a late step is far smaller than the cumulative one it replaced."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_output_payload_benchmark_smoke(tiny_ckpt: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.bench.output_payload", "--smoke", "--ckpt-dir", str(tiny_ckpt)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines() if re.match(r"\| (none|top 5) \|", line)]
    assert len(rows) == 6, proc.stdout
    for cells in rows:
        step, before, now = (int(c.strip().replace(",", "")) for c in cells[1:4])
        if step > 1:  # the prompt ids travel on the first output only
            assert now * 3 < before, cells
