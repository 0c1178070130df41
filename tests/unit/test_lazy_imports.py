"""Light entry points import neither torch nor Ray (nor transformers): errors, the serving
config, and `moe-cluster --help` stay fast and usable where those are absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "transformers", "deepspeed")

_PROBE = """
import contextlib, io, json, sys
stmt = sys.argv[1]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        exec(stmt)
    except SystemExit:
        pass
print(json.dumps({"loaded": sorted(m for m in {heavy} if m in sys.modules), "printed": out.getvalue()}))
""".replace("{heavy}", repr(HEAVY))


def _probe(stmt: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, stmt], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stmt", ["import cluster.errors", "import cluster", "import deployments.config",
                                  "from cluster.errors import ConfigError, RequestError"])
def test_light_modules_import_nothing_heavy(stmt):
    assert _probe(stmt)["loaded"] == []


def test_cli_help_imports_nothing_heavy():
    result = _probe("from deployments.cli import main; main(['--help'])")
    assert "serve" in result["printed"] and "make-checkpoint" in result["printed"]
    assert result["loaded"] == []


def test_the_probe_would_see_a_heavy_import():
    assert "torch" in _probe("import cluster.engine.llm_engine")["loaded"]
