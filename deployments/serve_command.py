"""`moe-cluster serve`: a local Ray cluster with the application, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from deployments.config import API_KEYS_ENV, AppConfig, api_keys_from_env, load_config, resolve_model_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the gRPC API",
                       description="Starts a local Ray cluster with the Serve application (ingress -> engine) "
                                   "and serves until Ctrl-C or SIGTERM. Flags override the config file.")
    p.add_argument("--model", default=None,
                   help="model directory (default: the embedded tiny checkpoint, made once and cached)")
    p.add_argument("--config", type=Path, default=None, help="YAML or JSON file of AppConfig fields")
    p.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000)")
    p.add_argument("--api-key", action="append", default=None, dest="api_keys",
                   help=f"require this bearer key (repeatable; or set {API_KEYS_ENV}=k1,k2)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="generation requests in flight per ingress replica before 429 (default 64)")
    p.add_argument("--max-queued-requests", type=int, default=None, help="Serve queue before 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask (4096)")
    p.add_argument("--grpc-reflection", action="store_true", default=None, help="enable gRPC server reflection")
    p.add_argument("--num-engine-replicas", "--num-router-replicas", type=int, default=None,
                   dest="num_engine_replicas", help="engine replicas (--num-router-replicas: its deprecated name)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray cluster offers (default: all)")
    p.add_argument("--max-model-len", type=_max_model_len, default=None,
                   help="context length: a number of tokens, or 'auto' (default): the checkpoint's, or what the KV "
                        "pool holds if less")
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV pool bytes per engine (default: on CPUs MOE_CLUSTER_CPU_KVCACHE_SPACE GiB, 1 if unset; "
                        "on GPUs what --gpu-memory-utilization leaves)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of the GPU's memory an engine may take (default 0.9)")
    p.add_argument("--target-step-ms", type=float, default=None,
                   help="prefill budget per step keeps a step near this many ms, decodes first (default: none)")


ENGINE_FLAGS = ("max_model_len", "kv_cache_bytes", "gpu_memory_utilization", "target_step_ms")


def _max_model_len(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens or 'auto', got {value!r}")
    return number


def config_from_args(args: argparse.Namespace) -> AppConfig:
    keys = args.api_keys if args.api_keys is not None else (list(api_keys_from_env()) or None)
    return load_config(args.config, model=args.model, host=args.host, http_port=args.http_port,
                       grpc_port=args.grpc_port, api_keys=keys, served_model_name=args.served_model_name,
                       max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
                       max_tokens=args.max_tokens, grpc_reflection=args.grpc_reflection,
                       num_engine_replicas=args.num_engine_replicas,
                       engine={k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None} or None)


def _interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    from cluster.model.preflight import check_model_dir

    config = config_from_args(args)
    # Checks before start: a bad model directory, or a context the KV pool cannot hold, is named in
    # one line before Ray is even imported.
    report = check_model_dir(resolve_model_dir(config.model))
    from cluster.engine.kv_pool import limits_before_start

    limits = limits_before_start(config.engine.to_engine_config(), report.config.text)
    if limits is not None:
        print(f"moe-cluster: each engine's {limits.describe()}", flush=True)
    from deployments import launch
    from deployments.frontend import drain

    launch.check_ports_free(config.host, {"HTTP": config.http_port, "gRPC": config.grpc_port})
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    started = interrupted = False
    drain_signal = None
    try:
        print(f"moe-cluster: starting Ray and the application ({config.model or 'embedded tiny checkpoint'})...",
              flush=True)
        launch.start_ray_and_serve(config, num_cpus=args.num_cpus)
        started = True
        # ray.init installs a SIGTERM handler that aborts the driver: put ours back.
        for s in previous:
            signal.signal(s, _interrupt)
        drain_signal = drain.start_signal(config.app_name)  # before the ingress replicas look for it
        # A local cluster of fixed size: a placement or replica that cannot be had is refused, not awaited.
        launch.deploy([config], refuse_unscheduled=True)
        auth = "API key required" if config.api_keys else "no API key"
        print(f"moe-cluster: serving ({auth})\n"
              f"  HTTP  http://{config.host}:{config.http_port}  (OpenAI API under /v1, /health, /ready)\n"
              f"  gRPC  {config.host}:{config.grpc_port}  (moe_cluster.v1.MoeCluster, grpc.health.v1.Health)\n"
              "Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nmoe-cluster: stopping...", file=sys.stderr, flush=True)
        interrupted = True
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if interrupted and drain_signal is not None:
            # New requests get 503 / UNAVAILABLE; those in flight run on, up to the graceful timeout.
            left = drain.drain(drain_signal, config.graceful_shutdown_timeout_s)
            print(f"moe-cluster: {'requests finished' if left == 0 else f'requests cut short: {left}'}",
                  file=sys.stderr, flush=True)
        if started:
            launch.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("moe-cluster: stopped", file=sys.stderr, flush=True)
    return 0
