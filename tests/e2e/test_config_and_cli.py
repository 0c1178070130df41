"""The Serve config file, the application builder and the `moe-cluster serve` command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from cluster.errors import ConfigError
from deployments.app import GRPC_SERVICER_FUNCTIONS, app_builder, build_app
from deployments.cli import main
from deployments.config import AppConfig, load_config
from tests import openai_check
from tests.e2e.support import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deployments" / "serve_config.yaml"


def test_serve_config_file_is_valid_and_builds():
    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    for fn in GRPC_SERVICER_FUNCTIONS:  # importable, as the proxy will import them
        module, name = fn.rsplit(".", 1)
        assert callable(getattr(__import__(module, fromlist=[name]), name))
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert isinstance(builder(app.args), Application)
    config = AppConfig.model_validate(app.args)
    assert (config.http_port, config.grpc_port) == (schema.http_options.port, schema.grpc_options.port)


def test_app_builder_refuses_bad_args():
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        app_builder({"max_ongoing_requests": 0})
    with pytest.raises(ConfigError, match="no_such_field"):
        app_builder({"no_such_field": 1})
    assert isinstance(build_app(AppConfig()), Application)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("http_port: 8100\napi_keys: [a, b]\nengine: {max_num_seqs: 8}\n")
    config = load_config(path, http_port=None, grpc_port=9100)
    assert (config.http_port, config.grpc_port, config.api_keys) == (8100, 9100, ("a", "b"))
    assert config.engine.to_engine_config().max_num_seqs == 8
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_serve_refuses_taken_ports(which, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1" if which == "http" else "", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = free_port()
        ports = (port, other) if which == "http" else (other, port)
        rc = main(["serve", "--http-port", str(ports[0]), "--grpc-port", str(ports[1])])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"port {port} is already in use" in err and ("HTTP" if which == "http" else "gRPC") in err


def _start_serve(model: Path, http_port: int, grpc_port: int) -> tuple[subprocess.Popen, str]:
    """`moe-cluster serve` in its own process, once it says it serves (or has exited)."""
    env = {**os.environ, "MOE_CLUSTER_API_KEYS": "cli-key"}
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--model", str(model),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--num-cpus", "4"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line or proc.poll() is not None:
            break
    return proc, "".join(lines)


def _serve_answers_and_stops(proc: subprocess.Popen, out: str, http_port: int, grpc_port: int) -> None:
    assert f"http://127.0.0.1:{http_port}" in out and f":{grpc_port}" in out, out
    r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"Authorization": "Bearer cli-key"}, timeout=60)
    openai_check.body(r)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "stopped" in rest


@pytest.mark.slow
def test_serve_command_runs_stops_on_sigterm_and_restarts_on_the_same_ports(tmp_path, tiny_ckpt):
    """The real command in its own process: serves, answers, exits 0 on SIGTERM; a second one on
    the same ports starts at once (the first one's connections in TIME_WAIT do not refuse it)."""
    http_port, grpc_port = free_port(), free_port()
    procs = []
    try:
        for _ in range(2):
            proc, out = _start_serve(tiny_ckpt, http_port, grpc_port)
            procs.append(proc)
            _serve_answers_and_stops(proc, out, http_port, grpc_port)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for port in (http_port, grpc_port):  # nothing left listening
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


@pytest.mark.slow
def test_serve_refuses_an_expert_placement_it_cannot_have(tmp_path, tiny_ckpt):
    """`moe-cluster serve` with the ray transport on a one-CPU cluster that the ingress replica
    fills: the expert shards' placement group (or, if it came first, the ingress replica) cannot
    be had, so the command exits 2 with one line naming what was asked and what is free, instead
    of waiting minutes and dying with a traceback."""
    config = tmp_path / "c.yaml"
    config.write_text("transport: ray\nnum_expert_shards: 2\nexpert_placement_timeout_s: 5\n"
                      "ingress_num_cpus: 1\nengine_num_cpus: 0\nvision: {num_replicas: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--model", str(tiny_ckpt),
                           "--config", str(config), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                           "--num-cpus", "1"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moe-cluster: error:")]
    assert len(errors) == 1, proc.stderr
    assert "cannot place" in errors[0] and "CPU" in errors[0] and "free now" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr.split("moe-cluster: error:")[-1]
