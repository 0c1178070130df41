"""Faults under load (issue 18): with 20 greedy streams in flight (16 HTTP chats with
`return_token_ids`, 4 gRPC GenerateStreams), an expert shard, an engine replica or an ingress
replica is SIGKILLed, the application is redeployed with a changed deployment option, or
`moe-cluster serve` gets SIGTERM. Every stream ends (none hangs), every finished answer has the
transformers reference's tokens under the tie rule, the ones that fail fail with an explicit
retryable error, and afterwards every engine replica passes `check_integrity()` with all its KV
blocks free, within RECOVERY_S of the fault.

Each test appends its figures to `$MOE_FAULT_REPORT` (tests/e2e/fault_load.py) when set;
`python -m ops.bench.fault_report FILE` makes the table of docs/OPERATIONS.md from it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx2 as httpx
import pytest
import ray
from ray import serve
from ray.util.state import list_actors

from cluster.model.tokenizer import Tokenizer
from deployments.app import ENGINE_DEPLOYMENT
from deployments.config import AppConfig
from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc
from tests.e2e.fault_load import LoadResult, Stream, describe, record, run_load
from tests.e2e.support import Server
from tests.reference import Reference, assert_matches_reference, reference_greedy

pytestmark = pytest.mark.slow  # three more applications; the expert ones need the expert-slot nodes

N_HTTP, N_GRPC = 16, 4
MAX_TOKENS = 48
MAX_NUM_SEQS = 4  # per engine replica: with 20 streams over two replicas, some wait in each engine
RECOVERY_S = 60.0
REDEPLOY_S = 120.0  # a rolling update is no outage (the old replicas serve on): the new version's start may take longer
EXCHANGE_DEADLINE_S = 5.0  # a killed shard is found out within this
NO_VISION = {"num_replicas": 0}
ENGINE = {"max_model_len": 1024, "num_kv_blocks": 256}  # a small KV pool: quick to start, 4096 tokens


@pytest.fixture(scope="module")
def streams(tiny_ckpt) -> list[Stream]:
    tokenizer = Tokenizer.from_model_dir(tiny_ckpt)
    out = []
    for i in range(N_HTTP + N_GRPC):
        messages = [{"role": "user", "content": f"Request {i}: tell me a story about the number {i * 7}."}]
        ids = list(tokenizer.encode_chat(messages).token_ids)
        out.append(Stream(messages, ids, "http" if i < N_HTTP else "grpc"))
    return out


@pytest.fixture(scope="module")
def references(tiny_ckpt, streams) -> list[Reference]:
    """The fault-free answers: transformers' greedy tokens of each prompt alone, with the gaps the
    tie rule needs."""
    return [reference_greedy(tiny_ckpt, s.prompt_ids, MAX_TOKENS) for s in streams]


def _config(server: Server, name: str, **fields: Any) -> AppConfig:
    main = server.apps["main"].model_dump(exclude_unset=True)
    return AppConfig.model_validate({**main, "app_name": name, "route_prefix": f"/{name}", "vision": NO_VISION,
                                     "engine": {**ENGINE, "max_num_seqs": MAX_NUM_SEQS}, **fields})


@pytest.fixture(scope="module")
def fault_server(server: Server) -> Iterator[Server]:
    """`faults`: two ingress and two engine replicas (local experts)."""
    server.apps["faults"] = _config(server, "faults", num_ingress_replicas=2, num_engine_replicas=2)
    yield server
    if "faults" in server.apps:
        server.remove("faults")


@pytest.fixture(params=["ray", "deepspeed"])
def expert_app(request, server: Server, expert_nodes) -> Iterator[str]:
    """One engine replica over two expert shards of the transport, deployed for the test alone
    (the two shard sets would not fit on the expert-slot nodes together)."""
    name = f"fault-{request.param}"
    server.apps[name] = _config(server, name, transport=request.param, num_expert_shards=2,
                                exchange_deadline_s=EXCHANGE_DEADLINE_S)
    server.app(name)
    yield name
    server.remove(name)


# -- what the tests look at ------------------------------------------------------------------

def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """Live Serve replicas of a deployment: replica id -> process id."""
    actors = list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", f"ServeReplica:{app}:{deployment}")],
                         limit=1000)
    return {a.name.rsplit("#", 1)[-1]: a.pid for a in actors}


def shard_pids(app: str) -> list[int]:
    """Process ids of the expert shards of `app`'s (one) engine replica, from its registry."""
    prefixes = (f"SERVE_DEPLOYMENT_ACTOR::{app}::{ENGINE_DEPLOYMENT}::", f"{app}-experts-")
    (named,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefixes)]
    registry = ray.get_actor(named["name"], namespace=named["namespace"])
    shards = ray.get(registry.current.remote(), timeout=30)[0]
    pids = []
    for shard in shards:
        (actor,) = list_actors(filters=[("actor_id", "=", shard._actor_id.hex())])
        pids.append(actor.pid)
    return pids


def running(app: str, replicas: dict[str, int]) -> bool:
    """The application runs with every deployment at its target number of replicas."""
    status = serve.status().applications.get(app)
    if status is None or status.status != "RUNNING":
        return False
    return all(status.deployments[d].replica_states.get("RUNNING", 0) == n for d, n in replicas.items())


def answers(server: Server, app: str) -> bool:
    try:
        r = httpx.post(server.url("/v1/chat/completions", app), headers=server.headers, timeout=10, json={
            "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2, "temperature": 0})
    except httpx.TransportError:
        return False
    return r.status_code == 200


def wait_recovered(server: Server, app: str, replicas: dict[str, int], since: float,
                   within_s: float = RECOVERY_S) -> float:
    """Seconds from `since` until the application runs at its target size again and answers."""
    deadline = since + within_s
    while not (running(app, replicas) and answers(server, app)):
        assert time.monotonic() < deadline, f"{app} not recovered {within_s}s after the fault: {serve.status()}"
        time.sleep(0.25)
    return time.monotonic() - since


def check_engines(app: str, timeout_s: float = 30.0) -> None:
    """Every live engine replica passes `check_integrity()` (its published method) with nothing
    running and every KV block free (the baseline of an idle engine). A check that fails raises."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app)
    deadline = time.monotonic() + timeout_s
    checked: dict[str, Any] = {}
    while True:
        live = set(replica_pids(app, ENGINE_DEPLOYMENT))
        try:
            replica, stats = handle.check_integrity.remote().result(timeout_s=10)
        except (ray.exceptions.RayActorError, TimeoutError):
            replica, stats = None, None  # a dead replica Serve has not dropped yet
        if stats is not None and stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0:
            checked[replica] = stats
        if live and live <= set(checked):
            return
        assert time.monotonic() < deadline, f"engines of {app} not idle and intact: live {live}, checked {checked}"
        time.sleep(0.1)


def wrong_answers(result: LoadResult, streams: list[Stream], references: list[Reference]) -> list[str]:
    wrong = []
    for o in result.outcomes:
        if o.status == "finished":
            try:
                assert_matches_reference(o.tokens, references[o.index], f"stream {o.index} ({o.protocol})")
            except AssertionError as exc:
                wrong.append(str(exc))
    return wrong


def explicit_503(result: LoadResult) -> bool:
    """Every stream that failed failed with a 503 (before it started, or as an SSE error event)
    or gRPC UNAVAILABLE."""
    return all(o.error.startswith(("HTTP 503", "SSE error 503", "gRPC UNAVAILABLE"))
               for o in result.outcomes if o.status == "retryable")


def load(server: Server, app: str, streams: list[Stream], fault: Callable[[], Any] | None,
         after_tokens: int = 2, when_started: int = 4) -> LoadResult:
    return asyncio.run(run_load(
        server.url("/v1/chat/completions", app), f"127.0.0.1:{server.grpc_port}", server.headers,
        server.metadata(app), streams, MAX_TOKENS, fault, after_tokens, when_started))


# -- the faults ------------------------------------------------------------------------------

def test_fault_free_load_matches_the_reference(fault_server: Server, streams, references) -> None:
    """The baseline: the same load without a fault finishes every stream with the reference's tokens."""
    fault_server.app("faults")
    check_engines("faults")
    result = load(fault_server, "faults", streams, None)
    wrong = wrong_answers(result, streams, references)
    record("none", result, None, len(wrong))
    assert result.by_status()["finished"] == len(streams), describe(result)
    assert not wrong, wrong
    check_engines("faults")


def test_expert_shard_sigkill(server: Server, expert_app: str, streams, references) -> None:
    """A shard killed mid-generation is replaced, the engine re-forms its group and re-runs the
    step: every stream finishes with the reference's tokens."""
    check_engines(expert_app)
    victim = shard_pids(expert_app)[1]
    recovery: dict[str, float] = {}

    def kill() -> None:
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovery["s"] = wait_recovered(server, expert_app, {ENGINE_DEPLOYMENT: 1}, started)

    result = load(server, expert_app, streams, kill, after_tokens=4)
    wrong = wrong_answers(result, streams, references)
    record(f"expert shard SIGKILL ({expert_app.removeprefix('fault-')})", result, recovery.get("s"), len(wrong))
    assert result.by_status()["finished"] == len(streams), describe(result)
    assert not wrong, wrong
    assert victim not in shard_pids(expert_app)  # replaced
    check_engines(expert_app)


def test_engine_replica_sigkill(fault_server: Server, streams, references) -> None:
    """The killed replica's streams that had sent tokens end with a retryable error (SSE error
    event 503, gRPC UNAVAILABLE); those it had not started yet are sent to the other replica and
    finish; the other replica's streams are untouched."""
    fault_server.app("faults")
    check_engines("faults")
    engines = replica_pids("faults", ENGINE_DEPLOYMENT)
    victim = sorted(engines.values())[0]
    recovery: dict[str, float] = {}

    def kill() -> None:
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovery["s"] = wait_recovered(fault_server, "faults", {ENGINE_DEPLOYMENT: 2, "Ingress": 2}, started)

    # Once as many streams have tokens as both replicas run at once, the victim's running ones have.
    result = load(fault_server, "faults", streams, kill, when_started=2 * MAX_NUM_SEQS)
    wrong = wrong_answers(result, streams, references)
    counts = result.by_status()
    record("engine replica SIGKILL", result, recovery.get("s"), len(wrong))
    assert counts["hung"] == counts["cut"] == counts["error"] == 0, describe(result)
    assert not wrong, wrong
    # The victim ran at most MAX_NUM_SEQS streams; everything else it held had sent nothing and
    # was sent again.
    assert 1 <= counts["retryable"] <= MAX_NUM_SEQS and explicit_503(result), describe(result)
    late = [o for o in result.outcomes if not result.started_before_fault(o, margin_s=0.5)]
    assert all(o.status == "finished" for o in late), describe(result)
    check_engines("faults")


def test_ingress_replica_sigkill(fault_server: Server, streams, references) -> None:
    """Streams through the killed ingress replica that had started end with a retryable error
    (Serve's proxy, with deployments/grpc/proxy_replica_lost.py: an SSE error event, UNAVAILABLE);
    those that had received nothing are sent to the other ingress replica (proxy_resend.py) and
    finish with the reference's tokens, as do the other ingress replica's streams."""
    fault_server.app("faults")
    check_engines("faults")
    victim = sorted(replica_pids("faults", "Ingress").values())[0]
    recovery: dict[str, float] = {}

    def kill() -> None:
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovery["s"] = wait_recovered(fault_server, "faults", {ENGINE_DEPLOYMENT: 2, "Ingress": 2}, started)

    resent_before = _resends_logged()
    result = load(fault_server, "faults", streams, kill)
    resent = _resends_logged() - resent_before
    wrong = wrong_answers(result, streams, references)
    counts = result.by_status()
    record("ingress replica SIGKILL", result, recovery.get("s"), len(wrong))
    assert counts["hung"] == counts["cut"] == counts["error"] == 0, describe(result)
    assert not wrong, wrong
    # Which calls the dead replica held depends on the proxies' choice and timing: begun ones fail
    # retryably, the rest are resent (the assertions below); how many of each is recorded, not assumed.
    print(f"ingress kill: {counts['retryable']} retryable, {resent} resent")
    assert counts["finished"] >= 1, describe(result)
    assert counts["retryable"] == 0 or explicit_503(result), describe(result)
    # Only streams whose response had begun failed (a 503 / UNAVAILABLE before any output would
    # mean a call was not resent); those not begun by the fault were resent and finished.
    assert all(o.started_at is not None for o in result.outcomes if o.status == "retryable"), describe(result)
    late = [o for o in result.outcomes if not result.started_before_fault(o, margin_s=0.5)]
    assert all(o.status == "finished" for o in late), describe(result)
    check_engines("faults")  # the streams the dead ingress held were aborted at the engines


def _resends_logged() -> int:
    """Calls the Serve proxies resent after their ingress replica died (proxy_resend.py logs each)."""
    from ray._private.worker import global_worker

    logs = os.path.join(global_worker.node.get_session_dir_path(), "logs", "serve")
    total = 0
    for name in os.listdir(logs) if os.path.isdir(logs) else ():
        if name.startswith("proxy_") and name.endswith(".log"):
            with open(os.path.join(logs, name), errors="replace") as f:
                total += sum("its ingress replica died before answering" in line for line in f)
    return total


def test_redeploy_with_a_changed_option_under_load(fault_server: Server, streams, references) -> None:
    """A changed engine option restarts every replica (a new version, not a user_config change
    applied in place): Serve starts new replicas and drains the old ones; no stream fails."""
    from deployments import launch

    fault_server.app("faults")
    check_engines("faults")
    before = set(replica_pids("faults", ENGINE_DEPLOYMENT))
    changed = _config(fault_server, "faults", num_ingress_replicas=2, num_engine_replicas=2,
                      engine={**ENGINE, "max_num_seqs": MAX_NUM_SEQS + 1})
    recovery: dict[str, float] = {}

    def redeploy() -> None:
        started = time.monotonic()
        launch.deploy([changed])
        fault_server.apps["faults"] = changed
        recovery["s"] = wait_recovered(fault_server, "faults", {ENGINE_DEPLOYMENT: 2, "Ingress": 2}, started,
                                       REDEPLOY_S)

    result = load(fault_server, "faults", streams, redeploy)
    wrong = wrong_answers(result, streams, references)
    record("redeploy (changed engine option)", result, recovery.get("s"), len(wrong))
    assert result.by_status()["finished"] == len(streams), describe(result)
    assert not wrong, wrong
    assert before.isdisjoint(replica_pids("faults", ENGINE_DEPLOYMENT)), "the engine replicas were not restarted"
    check_engines("faults")


def _grpc_status(port: int) -> tuple[Any, str]:
    """The status of a new unary Generate call to `moe-cluster serve`'s gRPC port."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.MoeClusterStub(channel).Generate(
                pb.GenerateRequest(text="late", sampling=pb.SamplingOptions(max_tokens=2)), timeout=30,
                metadata=[("application", "moe-cluster"), ("authorization", "Bearer cli-key")])
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tiny_ckpt, streams, references) -> None:
    """SIGTERM to `moe-cluster serve` under load: the streams in flight finish with the reference's
    tokens, a new request gets 503 / UNAVAILABLE (retryable) from then on, and the command exits 0."""
    from tests.e2e.support import free_port
    from tests.e2e.test_config_and_cli import _start_serve

    http_port, grpc_port = free_port(), free_port()
    proc, out = _start_serve(tiny_ckpt, http_port, grpc_port)
    try:
        assert "Press Ctrl-C" in out, out
        url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
        headers = {"Authorization": "Bearer cli-key"}
        refused: list[float] = []
        grpc_refused: list[tuple[Any, str]] = []
        admitted_after: list[int] = []
        exit_s: dict[str, float] = {}

        def sigterm() -> None:
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            deadline = started + 10
            while not refused and time.monotonic() < deadline:
                try:
                    r = httpx.post(url, headers=headers, timeout=30, json={
                        "messages": [{"role": "user", "content": "late"}], "max_tokens": 2, "temperature": 0})
                except httpx.TransportError:
                    break  # already stopped
                if r.status_code == 503:
                    assert r.json()["error"]["type"] == "service_unavailable" and "Retry-After" in r.headers
                    refused.append(time.monotonic() - started)
                    grpc_refused.append(_grpc_status(grpc_port))  # the streams still run: the server is up
                else:
                    admitted_after.append(r.status_code)
                    time.sleep(0.1)
            proc.wait(timeout=120)
            exit_s["s"] = time.monotonic() - started

        result = asyncio.run(run_load(url, f"127.0.0.1:{grpc_port}", headers,
                                      [("application", "moe-cluster"), ("authorization", "Bearer cli-key")],
                                      streams, MAX_TOKENS, sigterm, 2, 4))
        rest = proc.stdout.read() if proc.stdout else ""
        wrong = wrong_answers(result, streams, references)
        record("SIGTERM (moe-cluster serve)", result, None, len(wrong),
               note=f"503 {refused[0]:.1f} s after SIGTERM; exit after {exit_s.get('s', 0):.1f} s" if refused else "")
        assert result.by_status()["finished"] == len(streams), describe(result)
        assert not wrong, wrong
        assert refused, f"no 503 after SIGTERM (answers: {admitted_after})"
        code, details = grpc_refused[0]
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (code, details)
        assert all(code == 200 for code in admitted_after), admitted_after  # admitted before the drain: served
        assert proc.returncode == 0, rest
        assert "requests finished" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
