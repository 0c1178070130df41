"""ops/prometheus and ops/grafana: promtool checks the scrape config and the rules and runs the rule
unit tests; every dashboard query parses and names a project series; a real Prometheus scraping a
real Ray cluster (ops/prometheus/metrics_demo.py) answers every dashboard query with data.

promtool and prometheus come from Debian's `prometheus` package (scripts/test.sh installs it);
these tests fail, not skip, without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml

from tests.integration.prom_support import (
    DASHBOARDS,
    GRAFANA,
    PROJECT_SERIES,
    PROM,
    ROOT,
    RULE_TESTS,
    RULES,
    exported_series,
    known,
    panels,
    prom_query,
    queries,
    run,
    start_prometheus,
    stop_process,
    substitute,
    tool,
)
from tests.ray_session import free_port


def test_promtool_check_config():
    out = run(tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(RULES)} rule files found" in out.stdout + out.stderr


def test_promtool_check_rules():
    assert RULES
    out = run(tool("promtool"), "check", "rules", *map(str, RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules():
    assert RULE_TESTS
    out = run(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def _rules() -> list[dict[str, Any]]:
    return [r for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def test_every_alert_has_a_firing_unit_test_and_a_runbook():
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert {"MoeClusterTimeToFirstTokenHigh", "MoeClusterKVCacheNearlyFull", "MoeClusterExpertShardDown",
            "MoeClusterExpertImbalance", "MoeClusterHTTPErrorRate", "MoeClusterGRPCErrorRate",
            "MoeClusterAutoscalerAtCeiling"} <= alerts
    fired, quiet = set(), set()
    for f in RULE_TESTS:
        for t in yaml.safe_load(f.read_text())["tests"]:
            for a in t.get("alert_rule_test", []):
                (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    assert alerts <= fired, f"alerts never tested firing: {alerts - fired}"
    assert alerts <= quiet, f"alerts never tested quiet: {alerts - quiet}"
    for r in _rules():
        if "alert" in r:
            assert (ROOT / r["annotations"]["runbook"]).exists(), r["alert"]


def test_rules_name_existing_series():
    for r in _rules():
        names = PROJECT_SERIES.findall(r["expr"])
        unknown = [n for n in names if not known(n)]
        assert not unknown, f"{r.get('record') or r.get('alert')}: unknown series {unknown}"


# --------------------------------------------------------------------------------------------
# Dashboards
# --------------------------------------------------------------------------------------------

def test_dashboards_are_generated_and_well_formed():
    out = run(sys.executable, str(GRAFANA / "dashboards.py"), "--check")
    assert out.returncode == 0, out.stderr
    assert {p.name for p in DASHBOARDS} == {"serving-overview.json", "expert-parallel.json", "autoscaling.json"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for p in panels(board):
            assert p["targets"], f"{path.name}: {p['title']} has no query"


def test_every_panel_query_parses_and_names_a_project_series(tmp_path):
    """promtool parses every query (as recording rules of a scratch rule file)."""
    all_queries = [q for path in DASHBOARDS for q in queries(path)]
    assert len(all_queries) > 30
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(all_queries)]}]}
    scratch = tmp_path / "dashboards.rules.yml"
    scratch.write_text(yaml.safe_dump(rules))
    out = run(tool("promtool"), "check", "rules", str(scratch))
    assert out.returncode == 0, out.stdout + out.stderr
    for where, expr in all_queries:
        names = PROJECT_SERIES.findall(expr)
        assert names, f"{where} names no ray_moe_cluster_* / ray_serve_* series: {expr}"
        assert all(known(n) for n in names), f"{where}: unknown series in {expr}"


def test_substitution_is_strict():
    assert substitute('rate(x{a=~"$application"}[$__rate_interval])') == 'rate(x{a=~".*"}[1m])'
    with pytest.raises(AssertionError):
        substitute("rate(x[$nope])")


# --------------------------------------------------------------------------------------------
# A real Prometheus against a real Ray cluster
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory):
    """Ray (metrics_demo.py, its own local cluster in a subprocess) + Prometheus scraping it."""
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics_port = free_port()
    demo = subprocess.Popen([sys.executable, str(PROM / "metrics_demo.py"), "--metrics-port", str(metrics_port),
                             "--seconds", "400"], stdout=subprocess.PIPE, stderr=open(tmp / "demo.log", "w"),
                            text=True, env={**os.environ, "RAY_ADDRESS": ""})
    prom = None
    try:
        line = demo.stdout.readline()
        assert line.startswith("ready"), f"metrics demo failed: {(tmp / 'demo.log').read_text()[-3000:]}"
        prom, web_port = start_prometheus(tmp, [f"127.0.0.1:{metrics_port}"])
        # Ray exports every ~10 s; wait until the slowest families (the policies', from the Serve
        # controller) have two samples in a rate window.
        deadline = time.monotonic() + 180
        want = ["ray_moe_cluster_autoscaling_wanted_replicas", "ray_moe_cluster_time_to_first_token_seconds_bucket",
                "ray_serve_autoscaling_target_replicas", 'ray_moe_cluster_autoscaling_signal{signal="kv_usage"}',
                'ray_moe_cluster_autoscaling_signal{signal="expert_load"}', "ray_serve_num_http_requests_total",
                "ray_moe_cluster_grpc_responses_total"]
        while time.monotonic() < deadline:
            try:
                if all(prom_query(web_port, f"count_over_time({w}[1m]) >= 2")["data"]["result"] for w in want):
                    break
            except OSError:
                pass
            assert demo.poll() is None, (tmp / "demo.log").read_text()[-3000:]
            time.sleep(3)
        else:
            raise AssertionError(f"no data in time; prometheus log: {(tmp / 'prometheus.log').read_text()[-2000:]}")
        yield web_port
    finally:
        if prom is not None:
            stop_process(prom)
        stop_process(demo)


@pytest.mark.slow
def test_live_every_dashboard_query_returns_data(live_prometheus):
    empty = []
    for path in DASHBOARDS:
        for where, expr in queries(path):
            answer = prom_query(live_prometheus, expr)
            assert answer["status"] == "success", f"{where}: {answer.get('error')}: {expr}"
            if not answer["data"]["result"]:
                empty.append(f"{where}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


@pytest.mark.slow
def test_live_exported_series_match_the_registry(live_prometheus):
    names = {r["metric"]["__name__"] for r in prom_query(
        live_prometheus, 'count by (__name__) ({__name__=~"ray_moe_cluster_.+"})')["data"]["result"]}
    assert names == exported_series(), (names ^ exported_series())
    # Serve's tags reach the engine's series; the policy's series carry the deployment.
    kv = prom_query(live_prometheus, "ray_moe_cluster_kv_usage_ratio")["data"]["result"]
    assert {"application", "deployment", "replica"} <= set(kv[0]["metric"])
    wanted = prom_query(live_prometheus, 'ray_moe_cluster_autoscaling_wanted_replicas{deployment="EngineServer"}')
    assert wanted["data"]["result"], "EngineAutoscalingPolicy recorded no decision in the Serve controller"


@pytest.mark.slow
def test_live_engine_policy_scaled_up_on_kv_use(live_prometheus):
    """The stand-in engine server reports KV use 0.9 > 0.75 with nothing ongoing to speak of: the
    project's policy, loaded by the Serve controller from policy_function/policy_kwargs, takes it
    from one replica to its max of two."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = prom_query(live_prometheus, 'max(ray_serve_autoscaling_target_replicas{deployment="EngineServer"})')
        if r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) == 2:
            return
        time.sleep(3)
    raise AssertionError(f"EngineServer not scaled to 2: {r}")


@pytest.mark.slow
def test_live_recording_rules_evaluate(live_prometheus):
    for rule in ("moe_cluster:time_to_first_token_seconds:p95_5m", "moe_cluster:kv_usage_ratio:max",
                 "moe_cluster:http_error_ratio:rate5m", "moe_cluster:grpc_error_ratio:rate5m",
                 "moe_cluster:expert_imbalance_ratio:max"):
        deadline = time.monotonic() + 30
        while not prom_query(live_prometheus, rule)["data"]["result"]:
            assert time.monotonic() < deadline, f"{rule} has no value"
            time.sleep(2)
