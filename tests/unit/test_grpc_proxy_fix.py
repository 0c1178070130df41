"""The gRPC proxy workaround patches private classes of Ray Serve 2.60: this fails if the installed
Ray no longer has them (the patch would silently not install), and the requirement pins the minor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json
from deployments.grpc import proxy_fix
from ray.serve._private import proxy, proxy_request_response as prr
before = (proxy.ProxyResponseGenerator, prr.RayServegRPCContext)
proxy_fix.add_stream_cancellation_to_server(None, None)
print(json.dumps({
    "installed": proxy_fix._installed,
    "generator_replaced": proxy.ProxyResponseGenerator is not before[0]
        and issubclass(proxy.ProxyResponseGenerator, before[0]),
    "context_replaced": prr.RayServegRPCContext is not before[1],
}))
"""


def test_the_proxy_patch_installs_on_the_installed_ray():
    # A fresh interpreter: the patch changes Serve's proxy module for the whole process.
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "installed": True, "generator_replaced": True, "context_replaced": True}, done.stderr


def test_ray_is_pinned_to_the_patched_minor():
    import ray

    text = (ROOT / "pyproject.toml").read_text()
    assert '"ray[serve]>=2.60,<2.61"' in text
    assert ray.__version__.startswith("2.60."), ray.__version__
