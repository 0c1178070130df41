"""The prefix-cache benchmark's smoke mode runs end to end (behaviour only, never timing): with
caching on the later requests find the whole system prompt cached, with caching off nothing, and
both sides give the same first tokens (the benchmark fails otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prefix_cache_benchmark_smoke(tiny_ckpt: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.bench.prefix_cache", "--smoke", "--ckpt-dir", str(tiny_ckpt)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    rows = {cells[0].strip(): cells for cells in (line.strip().strip("|").split("|")
                                                  for line in proc.stdout.splitlines()
                                                  if line.startswith("| caching "))}
    assert sorted(rows) == ["caching off", "caching on"], proc.stdout
    assert rows["caching on"][4].strip() == "256", "the later requests find the 256-token system prompt cached"
    assert rows["caching off"][4].strip() == "0"
    assert "Goal: later requests' TTFT at most 0.2x" in proc.stdout
