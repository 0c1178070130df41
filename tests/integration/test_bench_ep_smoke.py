"""The expert-parallel benchmark's smoke mode runs end to end, so it never rots."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_ep_bench_smoke() -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.bench.ep", "--smoke"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| decode") or line.startswith("| prefill")]
    assert len(rows) == 3
    for row in rows:
        rates = [float(x) for x in re.findall(r"(\d+\.\d+) \(", row)] + [float(row.split("|")[2])]
        assert len(rates) == 3 and all(r > 0 for r in rates), row
    exchange = [line for line in proc.stdout.splitlines() if re.match(r"\| (1|16) \| \d+", line)]
    assert len(exchange) == 2
