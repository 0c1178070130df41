"""Shared by the tests that run promtool or a real Prometheus: the dashboards' queries with Grafana's
variables substituted, Prometheus' HTTP API, and a Prometheus process scraping Ray's metrics ports.

promtool and prometheus come from Debian's `prometheus` package (scripts/test.sh installs it);
the tests fail, not skip, without them."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from deployments.telemetry.metrics import METRICS
from tests.ray_session import free_port

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "ops" / "prometheus"
GRAFANA = ROOT / "ops" / "grafana"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
PROJECT_SERIES = re.compile(r"\b(ray_moe_cluster_[a-z0-9_]+|ray_serve_[a-z0-9_]+)")

GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "30s", "__range": "5m", "__range_s": "300",
                "__interval_ms": "30000", "application": ".*", "datasource": "prometheus"}


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, (f"{name} is missing: install Debian's prometheus package "
                   "(scripts/test.sh does: apt-get install -y prometheus)")
    return found


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def exported_series() -> set[str]:
    """Every series name Prometheus stores for the project's metrics (a histogram: its bucket, sum
    and count)."""
    parts = {"histogram": ("_bucket", "_sum", "_count")}
    return {m.exported + part for m in METRICS for part in parts.get(m.kind, ("",))}


def known(name: str) -> bool:
    """A ray_serve_* series, or a ray_moe_cluster_* series of the registry."""
    return not name.startswith("ray_moe_cluster_") or name in exported_series()


def substitute(expr: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARS, f"unknown Grafana variable {name} in {expr}"
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out += panels(p) if p.get("type") == "row" and p.get("panels") else ([] if p.get("type") == "row" else [p])
    return out


def queries(path: Path) -> list[tuple[str, str]]:
    """(where, query) of every panel target of a dashboard, Grafana variables substituted."""
    board = json.loads(path.read_text())
    return [(f"{path.stem}: {p['title']} [{t['refId']}]", substitute(t["expr"]))
            for p in panels(board) for t in p.get("targets", [])]


def prom_query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # 400: the query does not parse
        return json.load(exc)


def has_data(port: int, expr: str) -> bool:
    try:
        answer = prom_query(port, expr)
    except OSError:
        return False
    return answer.get("status") == "success" and bool(answer["data"]["result"])


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_prometheus(tmp: Path, targets: Iterable[str], interval: str = "2s") -> tuple[subprocess.Popen, int]:
    """Prometheus (the project's config, rules included) scraping `targets` (host:port) every
    `interval`, on a free port; returns the process and its port once it answers."""
    web_port = free_port()
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(f) for f in RULES]
    config["scrape_configs"] = [{"job_name": "ray", "static_configs": [{"targets": sorted(targets)}]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{web_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/-/ready", timeout=2):
                return proc, web_port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise AssertionError(
                    f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}") from None
            time.sleep(0.5)
