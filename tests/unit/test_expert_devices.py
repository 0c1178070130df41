"""The exchange's devices as far as a CPU can see them (cluster/experts/devices.py): the shards'
device and dtype, the deepspeed backend (NCCL only when everything is on GPUs, a mix refused),
the ray transport's rows in bf16 through a real socket (without Ray), the Ray resources shards
and engines ask for, and the serving config's rules for them. The GPU paths themselves (NCCL on
CUDA tensors, pinned host copies) are unverified here: see docs/OPERATIONS.md."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from cluster.errors import ConfigError
from cluster.experts.devices import PinnedStaging, backend_device, exchange_backend, shard_device, shard_dtype
from cluster.experts.dispatchers import load_local_dispatcher
from cluster.experts.placement import ExpertPlacement
from cluster.experts.shard import ExpertShard
from cluster.experts.shard_placement import EXPERT_SLOT, shard_bundle
from cluster.experts.transport_ray import Coalescer, RayDispatcher
from cluster.experts.wire import ExchangeClient, ExchangeServer, FrameLimits, WireSecret
from cluster.model.checkpoint import CheckpointReader
from deployments.config import parse_config

pytestmark = pytest.mark.unit
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_shard_device_follows_its_gpu_ask() -> None:
    assert shard_device(0) == CPU
    assert shard_device(1, cuda_available=True) == CUDA
    assert shard_device(0.5, cuda_available=True) == CUDA  # a share of a GPU is still that GPU
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        shard_device(1, cuda_available=False)


def test_shard_dtype_is_the_engines_else_bf16_on_gpus() -> None:
    assert shard_dtype("float32", CUDA) == torch.float32
    assert shard_dtype("bfloat16", CPU) == torch.bfloat16
    assert shard_dtype(None, CUDA) == torch.bfloat16
    assert shard_dtype(None, CPU) is None  # the checkpoint's own


def test_deepspeed_backend_is_nccl_only_on_gpus_and_refuses_a_mix() -> None:
    assert exchange_backend(CUDA, CUDA) == "nccl"
    assert exchange_backend(torch.device("cuda:1"), CUDA) == "nccl"
    assert exchange_backend(CPU, CPU) == "gloo"
    for engine, shards in ((CPU, CUDA), (CUDA, CPU)):
        with pytest.raises(ConfigError, match="both on GPUs"):
            exchange_backend(engine, shards)
    assert backend_device("nccl") == CUDA and backend_device("gloo") == CPU


def test_pinned_staging_on_a_cpu_host() -> None:
    staging = PinnedStaging()
    rows = torch.randn(3, 4)
    assert staging.to_host(rows) is rows  # CPU rows need no copy
    view = staging.take(48)
    assert view.numel() == 48 and staging.buffer is not None and staging.buffer.numel() == 48
    assert staging.take(16).data_ptr() == view.data_ptr()  # reused, not reallocated
    landed = staging.to_device(view.view(torch.float32).view(3, 4), CPU)
    assert landed.data_ptr() != view.data_ptr()  # a view of the buffer is copied out before reuse


@pytest.fixture
def shard(tiny_ckpt: Path) -> ExpertShard:
    reader = CheckpointReader(tiny_ckpt)
    return ExpertShard(reader, ExpertPlacement.of_model(reader.config.text, 1), 0)


class RecordingCompute:
    """The shard's compute behind the socket, noting the dtype each frame arrived in."""

    def __init__(self, shard: ExpertShard) -> None:
        self.coalescer = Coalescer(shard)
        self.dtypes: list[torch.dtype] = []
        self._lock = threading.Lock()

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.dtypes.append(hidden.dtype)
        return self.coalescer.compute(layer, hidden, ids, weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ray_rows_travel_in_the_engines_dtype(tiny_ckpt: Path, shard: ExpertShard, dtype: torch.dtype,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 engine's rows cross the socket as bf16 (half the bytes of fp32), an fp32 engine's as
    fp32; the shard (fp32 experts) computes and answers in the frame's dtype; the result is the
    in-process experts' at the rows' precision."""
    text = CheckpointReader(tiny_ckpt).config.text
    secret = WireSecret(b"s" * 32)
    compute = RecordingCompute(shard)
    server = ExchangeServer(compute, secret, FrameLimits(text.hidden_size, text.num_experts_per_tok, 64), "127.0.0.1")
    try:
        placement = ExpertPlacement.of_model(text, 1)
        dispatcher = RayDispatcher(placement, [object()], secret, deadline_s=10)
        client = ExchangeClient(("127.0.0.1", server.port), secret, 10)
        monkeypatch.setattr(dispatcher, "_client", lambda rank, deadline: client)  # no Ray: the address is known
        gen = torch.Generator().manual_seed(3)
        hidden = torch.randn(5, text.hidden_size, generator=gen).to(dtype)  # [T, H]
        ids = torch.stack([torch.randperm(text.n_routed_experts, generator=gen)[:text.num_experts_per_tok]
                           for _ in range(5)])  # [T, K]
        weights = torch.rand(5, text.num_experts_per_tok, generator=gen)  # [T, K]
        layer = text.moe_layers[0]
        out = dispatcher.dispatch(layer, hidden, ids, weights)
        dispatcher.close()
    finally:
        server.close()
    assert compute.dtypes == [dtype]
    assert out.dtype == dtype and out.shape == hidden.shape
    local = load_local_dispatcher(tiny_ckpt).dispatch(layer, hidden.float(), ids, weights)  # fp32 reference
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.float(), local, **tol)


def test_shard_bundle_asks_for_the_shards_gpus() -> None:
    assert shard_bundle(True) == {EXPERT_SLOT: 1.0, "CPU": 0.01}
    assert shard_bundle(False, 1.0) == {"CPU": 0.01, "GPU": 1.0}
    assert shard_bundle(True, 0.5)["GPU"] == 0.5


def test_serving_config_carries_gpu_asks_into_the_group(tiny_ckpt: Path) -> None:
    from deployments.serving.expert_registry import group_spec

    config = parse_config({"transport": "ray", "num_expert_shards": 2, "shard_num_gpus": 1, "engine_num_gpus": 1,
                           "engine": {"dtype": "bfloat16"}})
    spec = group_spec(config, tiny_ckpt)
    assert (spec.shard_num_gpus, spec.engine_num_gpus) == (1.0, 1.0)
    assert spec.shard_device() == CUDA
    assert spec.engine.dtype == "bfloat16"


def test_serving_config_refuses_gpu_shards_without_shards_and_a_mixed_deepspeed_group() -> None:
    with pytest.raises(ConfigError, match="shard_num_gpus is for expert shard actors"):
        parse_config({"transport": "local", "shard_num_gpus": 1})
    with pytest.raises(ConfigError, match="not a mix"):
        parse_config({"transport": "deepspeed", "num_expert_shards": 2, "shard_num_gpus": 1})
    ok = parse_config({"transport": "deepspeed", "num_expert_shards": 2, "shard_num_gpus": 1, "engine_num_gpus": 1})
    assert ok.shard_num_gpus == 1


def test_engine_deployment_asks_ray_for_its_gpus() -> None:
    from deployments.app import ENGINE_DEPLOYMENT, build_app

    app = build_app(parse_config({"engine_num_gpus": 1, "engine_num_cpus": 2}))
    deployments = {d.name: d for d in _deployments(app)}
    options = deployments[ENGINE_DEPLOYMENT].ray_actor_options
    assert options["num_gpus"] == 1 and options["num_cpus"] == 2


def _deployments(app: object) -> list:
    """The deployments bound into a Serve application (the ingress and what it was bound with)."""
    found, todo = [], [app]
    while todo:
        node = todo.pop()
        deployment = getattr(node, "_bound_deployment", None)
        if deployment is not None:
            found.append(deployment)
            todo.extend(a for a in deployment.init_args if hasattr(a, "_bound_deployment"))
    return found
