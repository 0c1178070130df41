"""The prepared GPU check (scripts/gpu_check.sh) runs end to end on a CPU in its smoke mode, so it is
known to work before a GPU is ever lent: checkpoints and fp32 references made by its preparation
script, every stage without an error, parity judged (the tiny checkpoint in bf16 passes the bf16
rule against its fp32 reference), a decode row per batch for bf16 and FP8 experts with the roofline
and transformers beside it, prefill rows, and the table in the file named by the environment.
Behaviour only, never timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench.gpu_check_refs import DEFAULT_REFS_DIR, fingerprint, prepare

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_gpu_check_smoke(tmp_path: Path) -> None:
    ckpt, refs = tmp_path / "ckpt", tmp_path / "refs"
    prepare(ckpt, refs, ["tiny"])
    committed = json.loads((DEFAULT_REFS_DIR / "tiny.json").read_text())
    made = json.loads((refs / "tiny.json").read_text())
    # the committed reference is the writer's checkpoint's (else the GPU run would refuse to compare)
    assert committed["fingerprint"] == fingerprint(ckpt / "tiny") == made["fingerprint"]
    assert committed["prompts"][0]["tokens"] == made["prompts"][0]["tokens"]
    table_file = tmp_path / "table.md"
    env = {**os.environ, "PYTHON": sys.executable, "MOE_GPU_CHECK_TABLE": str(table_file)}
    proc = subprocess.run(["scripts/gpu_check.sh", "--device", "cpu", "--smoke", "--out", str(tmp_path / "out"),
                           "--ckpt-dir", str(ckpt), "--refs-dir", str(refs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    for stage in ("probe", "parity", "speed-bf16", "speed-fp8", "transformers"):
        result = json.loads((tmp_path / "out" / f"{stage}.json").read_text())
        assert "error" not in result, (stage, result)
    table = table_file.read_text()
    assert table in proc.stdout
    rows = [_cells(line) for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    parity = [r for r in rows if r[0] == "tiny"]
    assert len(parity) == 1 and parity[0][-1] == "pass" and int(parity[0][2]) >= 32, table
    for weights in ("bf16", "fp8 experts"):
        decode = [r for r in rows if r[0] == weights]
        assert [r[1] for r in decode] == ["1", "2", "4"], table
        assert all(float(r[3]) > 0 and r[5] != "-" for r in decode), table  # roofline and transformers beside
        assert [r for r in rows if r[0] == f"{weights} prefill"], table
    assert "of the roofline (goal 50%)" in table
