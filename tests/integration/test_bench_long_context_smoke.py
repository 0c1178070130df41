"""The long-context benchmarks' smoke modes run end to end, so `ops/bench/long_context.py` and
`ops/bench/step_profile.py` never rot.

Behaviour only, never timing: a 16K-token prompt of the `long` preset goes through `moe-cluster
serve` and streams its answer, the KV blocks the engine counted cover the prompt, and the engine
process's memory is read; the step profile times every prefill chunk and its attention."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # its own Ray cluster and Serve, through `moe-cluster serve` in a child process
def test_long_context_serve_smoke(long_ckpt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's cluster
    proc = subprocess.run([sys.executable, "-m", "ops.bench.long_context", "--smoke", "--ckpt-dir", str(long_ckpt),
                           "--poll-s", "0.25"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith("| 16,384 |")]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0].strip().strip("|").split("|")]
    used, total = (int(x.replace(",", "")) for x in cells[5].split(" / "))
    block, per_token = int(cells[6]), int(cells[7])
    # the prompt's blocks at least (a poll after its prefill), the whole request's at most
    assert -(-16_384 // block) <= used <= -(-(16_384 + 64) // block) < total, rows[0]
    assert per_token == (32 + 16) * 4, rows[0]  # (kv_lora_rank + rope) x 1 layer x fp32, by hand
    assert int(cells[1].replace(",", "")) > 16_384 + 64, rows[0]  # max_model_len
    assert float(cells[2].replace(",", "")) > 0 and float(cells[3].replace(",", "")) > 0  # TTFT, engine CPU
    assert float(cells[-1].split()[0].replace(",", "")) > 0  # the engine's peak RSS
    assert "exited 0 on SIGTERM" in out


def test_step_profile_smoke(long_ckpt: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.bench.step_profile", "--smoke", "--ckpt-dir", str(long_ckpt)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    # 8,192 tokens in 1,024-token steps: 8 steps; the last (context 7,168) runs under the profiler
    rows = re.findall(r"^\| ([\d,]+) - ([\d,]+) \| (\d+) \| ([\d,.]+) \| ([\d,.]+) \|", out, re.M)
    assert [int(r[0].replace(",", "")) for r in rows] == list(range(0, 7 * 1024, 1024)), out
    assert all(float(r[3].replace(",", "")) > float(r[4].replace(",", "")) > 0 for r in rows), out
    assert re.search(r"Last group against the first: .* rest \*\*[\d.]+x\*\*, attention per query-key pair", out)
    assert "aten::" in out, "no torch.profiler table"
