"""The attention benchmark's smoke mode runs end to end (behaviour only, never timing): every prefill
and decode row is there, and the torch backend's outputs agree with the implementation it replaced
to float noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_attention_benchmark_smoke() -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.bench.attention", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    rows = [_cells(line) for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    prefill = [r for r in rows if r[0].isdigit()]
    decode = [r for r in rows if " x " in r[0]]
    assert [(r[0], r[1]) for r in prefill] == [("64", "64"), ("64", "256"), ("64", "1,024")], proc.stdout
    assert [r[0] for r in decode] == ["1 x 1024 + 7 x 16-128", "8 x 128"], proc.stdout
    assert int(decode[0][1].replace(",", "")) < int(decode[0][2].replace(",", "")) / 4  # sum << B x longest
    for r in prefill + decode:
        diff, scale = r[-1].split(" (of ")
        assert float(diff) <= 1e-5 * float(scale.rstrip(")")), r
