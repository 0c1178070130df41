"""The Serve config `moe-cluster plan --write-config` writes deploys: `moe-cluster serve --config`
on a local cluster with the tiny checkpoint serves, with the KV pool the plan gave it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from deployments.cli import main
from tests.e2e.support import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "plan-key"


@pytest.mark.slow
def test_written_config_deploys(tiny_ckpt, tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    assert main(["plan", "--model", str(tiny_ckpt), "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "256MiB",
                 "--accelerator", "cpu", "--context", "1024", "--batch", "2", "--write-config", str(path)]) == 0
    assert "transport local" in capsys.readouterr().out
    args = yaml.safe_load(path.read_text())["applications"][0]["args"]
    # tiny preset: 2 layers x 16-token blocks x (kv_lora 32 + rope 16) x 4 bytes per KV block
    blocks = args["engine"]["kv_cache_bytes"] // (2 * 16 * (32 + 16) * 4)
    assert blocks >= 2 * 1024 // 16  # the plan's batch of two full-context sequences

    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--config", str(path),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--num-cpus", "4"],
                            cwd=ROOT, env={**os.environ, "MOE_CLUSTER_API_KEYS": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            out.append(proc.stdout.readline())
            if "Press Ctrl-C" in out[-1]:
                break
        assert "Press Ctrl-C" in out[-1], "".join(out)
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["choices"], r.text
        stats = httpx.get(f"http://127.0.0.1:{http_port}/v1/engine/stats", headers=headers, timeout=30).json()
        assert stats["kv_blocks_total"] == blocks
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
