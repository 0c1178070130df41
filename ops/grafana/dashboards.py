"""Generates the Grafana dashboards of moe-cluster (JSON beside this file):

    python ops/grafana/dashboards.py          # rewrite the JSON files
    python ops/grafana/dashboards.py --check  # exit 1 if they differ from what this generates

Import the JSON into Grafana (Dashboards > New > Import) with a Prometheus data source that scrapes
ops/prometheus/prometheus.yml. Every query names a project series (ray_moe_cluster_*, from
deployments/telemetry/metrics.py) or a Ray Serve one (ray_serve_*: HTTP request counts and latencies
by route template and status, replicas, autoscaling); the tests parse every query with promtool.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GENERATION_ROUTES = "/v1/chat/completions|/v1/completions"
ABORT_REASONS = "client|deadline|error"  # finish reasons that are abort causes (deployments.telemetry.metrics)
APP = 'application=~"$application"'
RI = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(series: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99),
              where: str = "") -> list[dict[str, Any]]:
    extra = f"{by}, " if by else ""
    legend_by = "".join(f"{{{{{b.strip()}}}}} " for b in by.split(",") if b.strip())
    labels = f"{APP},{where}" if where else APP
    return [q(f"histogram_quantile({x}, sum by ({extra}le) (rate({series}_bucket{{{labels}}}[{RI}])))",
              f"{legend_by}p{int(x * 100)}") for x in qs]


class Board:
    def __init__(self, uid: str, title: str, description: str, tags: list[str]) -> None:
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels: list[dict[str, Any]] = []
        self._y = 0
        self._x = 0
        self._id = 0

    def row(self, title: str) -> None:
        self._newline()
        self._id += 1
        self.panels.append({"id": self._id, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._x, self._y = 0, self._y + 8

    def panel(self, title: str, targets: list[dict[str, Any]], unit: str = "short", description: str = "",
              kind: str = "timeseries", width: int = 8, **field_defaults: Any) -> None:
        if self._x + width > 24:
            self._newline()
        self._id += 1
        refs = "ABCDEFGHIJ"
        self.panels.append({
            "id": self._id, "type": kind, "title": title, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": width, "x": self._x, "y": self._y},
            "fieldConfig": {"defaults": {"unit": unit, **field_defaults}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {},
            "targets": [{**t, "refId": refs[i], "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, t in enumerate(targets)],
        })
        self._x += width

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": self.tags,
            "editable": True, "graphTooltip": 1, "refresh": "30s", "schemaVersion": 39, "version": 1,
            "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "browser",
            "annotations": {"list": []}, "links": [],
            "templating": {"list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                 "current": {}, "hide": 0, "refresh": 1},
                {"name": "application", "label": "Application", "type": "query",
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": {"query": "label_values(ray_serve_deployment_replica_healthy, application)",
                           "refId": "application"},
                 "definition": "label_values(ray_serve_deployment_replica_healthy, application)",
                 "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0,
                 "sort": 1},
            ]},
            "panels": self.panels,
        }


def serving_overview() -> Board:
    b = Board("moe-cluster-serving", "moe-cluster / Serving overview",
              "Requests, latencies, tokens, KV cache and API status of the moe-cluster Serve application.",
              ["moe-cluster", "serving"])
    b.row("Load")
    b.panel("Requests running", [q(f"sum by (replica) (ray_moe_cluster_requests_running{{{APP}}})", "{{replica}}")],
            description="Sequences in each engine replica's running batch.")
    b.panel("Requests waiting", [q(f"sum by (replica) (ray_moe_cluster_requests_waiting{{{APP}}})", "{{replica}}")],
            description="Sequences waiting for KV blocks or a batch slot.")
    b.panel("Tokens / s", [
        q(f"sum(rate(ray_moe_cluster_generation_tokens_total{{{APP}}}[{RI}]))", "generated"),
        q(f"sum(rate(ray_moe_cluster_prompt_tokens_total{{{APP}}}[{RI}]))", "prompt")], unit="short")
    b.row("Latency")
    b.panel("Time to first token", quantiles("ray_moe_cluster_time_to_first_token_seconds"), unit="s")
    b.panel("Inter-token latency", quantiles("ray_moe_cluster_inter_token_latency_seconds"), unit="s")
    b.panel("End-to-end latency (HTTP generation)",
            quantiles("ray_serve_http_request_latency_ms", qs=(0.5, 0.95), where=f'route=~"{GENERATION_ROUTES}"'),
            unit="ms", description="Serve's proxy: request arrival to its last byte (a stream's whole length).")
    b.row("KV cache")
    b.panel("KV cache use", [q(f"max by (replica) (ray_moe_cluster_kv_usage_ratio{{{APP}}})", "{{replica}}")],
            unit="percentunit", min=0, max=1)
    b.panel("KV blocks", [
        q(f"sum(ray_moe_cluster_kv_blocks_used{{{APP}}})", "used"),
        q(f"sum(ray_moe_cluster_kv_blocks_capacity{{{APP}}})", "capacity")])
    b.panel("Requests finished / s", [
        q(f"sum by (reason) (rate(ray_moe_cluster_requests_finished_total{{{APP}}}[{RI}]))", "{{reason}}")],
        unit="reqps", description="By finish reason (stop, length, tool_calls) or abort cause.")
    b.row("API")
    b.panel("HTTP responses / s", [
        q(f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{{{APP}}}[{RI}]))",
          "{{route}} {{status_code}}")], unit="reqps", width=12, description="Serve's proxy, by route template.")
    b.panel("gRPC calls / s", [
        q(f"sum by (method, code) (rate(ray_moe_cluster_grpc_responses_total{{{APP}}}[{RI}]))",
          "{{method}} {{code}}")], unit="reqps", width=12, description="The ingress, by method and status.")
    b.panel("Aborts / s", [
        q(f'sum by (reason) (rate(ray_moe_cluster_requests_finished_total{{{APP},reason=~"{ABORT_REASONS}"}}[{RI}]))',
          "{{reason}}")], unit="reqps",
        description="Requests ended before completion: client gone, deadline passed, error.")
    # `or vector(0)`: no 5xx at all is a ratio of 0, not an empty panel.
    b.panel("Server error ratio", [
        q(f'(sum(rate(ray_serve_num_http_requests_total{{{APP},status_code=~"5.."}}[{RI}])) or vector(0)) '
          f"/ sum(rate(ray_serve_num_http_requests_total{{{APP}}}[{RI}]))", "HTTP 5xx")],
        unit="percentunit", min=0)
    b.panel("Serve replicas healthy", [
        q(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}")])
    b.row("Images")
    b.panel("Image preprocessing", quantiles("ray_moe_cluster_image_preprocess_seconds", qs=(0.5, 0.95)), unit="s",
            width=12)
    b.panel("Vision encoder", quantiles("ray_moe_cluster_vision_encoder_seconds", qs=(0.5, 0.95)), unit="s",
            width=12)
    return b


def expert_group() -> Board:
    b = Board("moe-cluster-experts", "moe-cluster / Expert-parallel group",
              "Token exchange, expert load and balance, shard health and group re-forms.",
              ["moe-cluster", "experts"])
    b.row("Exchange")
    b.panel("Exchange latency", quantiles("ray_moe_cluster_expert_exchange_latency_seconds", by="transport",
                                          qs=(0.5, 0.99)), unit="s",
            description="One MoE layer's dispatch + expert compute + combine, as the engine sees it.")
    b.panel("Exchanges / s", [
        q(f"sum by (transport) (rate(ray_moe_cluster_expert_exchange_latency_seconds_count{{{APP}}}[{RI}]))",
          "{{transport}}")])
    b.panel("Forward passes / s", [
        q(f"sum by (replica) (rate(ray_moe_cluster_forward_calls_total{{{APP}}}[{RI}]))", "{{replica}}")])
    b.row("Expert load")
    b.panel("Expert imbalance (max / mean) per layer", [
        q(f"max by (layer) (ray_moe_cluster_expert_imbalance_ratio{{{APP}}})", "layer {{layer}}")], width=12,
        min=1)
    b.panel("Routed tokens / s per layer", [
        q(f"sum by (layer) (rate(ray_moe_cluster_expert_tokens_total{{{APP}}}[{RI}]))", "layer {{layer}}")],
        width=12)
    b.panel("Tokens / s per (layer, expert)", [
        q(f"sum by (layer, expert) (rate(ray_moe_cluster_expert_tokens_total{{{APP}}}[{RI}]))",
          "{{layer}}/{{expert}}")], kind="heatmap", width=24)
    b.row("Health")
    b.panel("Shards up", [q(f"min by (rank) (ray_moe_cluster_shard_up{{{APP}}})", "rank {{rank}}")], min=0, max=1)
    b.panel("Group re-forms", [
        q(f"sum(increase(ray_moe_cluster_group_reforms_total{{{APP}}}[{RI}]))", "re-forms"),
        q(f"histogram_quantile(0.95, sum by (le) (rate(ray_moe_cluster_group_reform_seconds_bucket{{{APP}}}[{RI}])))",
          "p95 seconds")])
    b.panel("Serve replicas healthy", [
        q(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}")])
    return b


def autoscaling() -> Board:
    b = Board("moe-cluster-autoscaling", "moe-cluster / Autoscaling",
              "Replica counts, the autoscaling policies' inputs and decisions, and the capacity they follow.",
              ["moe-cluster", "autoscaling"])
    b.row("Replicas")
    b.panel("Target replicas", [
        q(f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})", "{{deployment}}")])
    b.panel("Healthy replicas", [
        q(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}")])
    b.panel("Decision before bounds", [
        q(f"max by (deployment) (ray_serve_autoscaling_desired_replicas{{{APP}}})", "{{deployment}} (Serve)"),
        q(f"max by (deployment) (ray_moe_cluster_autoscaling_wanted_replicas{{{APP}}})", "{{deployment}} wants"),
        q(f"max by (deployment) (ray_moe_cluster_autoscaling_max_replicas{{{APP}}})", "{{deployment}} max")],
        description="Above max: the deployment is at its ceiling (alert MoeClusterAutoscalerAtCeiling).")
    b.row("Engine signals")
    b.panel("KV use per engine replica", [
        q(f"max by (replica) (ray_moe_cluster_kv_usage_ratio{{{APP}}})", "{{replica}}"),
        q(f'max(ray_moe_cluster_autoscaling_signal{{{APP},signal="kv_usage"}})', "policy mean")],
        unit="percentunit", min=0, max=1)
    b.panel("Waiting per engine replica", [
        q(f"max by (replica) (ray_moe_cluster_requests_waiting{{{APP}}})", "{{replica}}"),
        q(f'max(ray_moe_cluster_autoscaling_signal{{{APP},signal="num_waiting"}})', "policy mean")])
    b.panel("Preemptions / s", [
        q(f"sum by (replica) (rate(ray_moe_cluster_preemptions_total{{{APP}}}[{RI}]))", "{{replica}}")])
    b.row("Ingress and experts")
    b.panel("Ongoing requests (autoscaler's view)", [
        q(f"max by (deployment) (ray_serve_autoscaling_total_requests{{{APP}}})", "{{deployment}}"),
        q(f"max by (deployment) (ray_serve_autoscaling_target_ongoing_requests{{{APP}}})", "{{deployment}} target")])
    b.panel("Expert policy signals", [
        q("max by (deployment, signal) (ray_moe_cluster_autoscaling_signal"
          f'{{{APP},signal=~"expert_load|exchange_latency_s"}})', "{{deployment}} {{signal}}")])
    b.panel("Policy execution time", [
        q(f"max by (deployment) (ray_serve_autoscaling_policy_execution_time_ms{{{APP}}})", "{{deployment}}")],
        unit="ms")
    return b


BOARDS = {"serving-overview.json": serving_overview, "expert-parallel.json": expert_group,
          "autoscaling.json": autoscaling}


def render() -> dict[str, str]:
    return {name: json.dumps(make().to_json(), indent=2) + "\n" for name, make in BOARDS.items()}


def main(argv: list[str]) -> int:
    stale = []
    for name, text in render().items():
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run python ops/grafana/dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
