"""Shared fixtures: checkpoints are written once per test session; the session's one Ray cluster
(tests/ray_session.py) starts for the first test that needs it. Test tiers by directory (a marker
each, see pyproject.toml): tests/unit `unit` (no Ray), tests/integration `integration`,
tests/e2e `e2e`; `slow` and `gpu` are set per test, and every test that uses the expert-slot nodes
(`expert_nodes`) is `slow`: the quick tiers never start them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cluster.engine.kv_pool import CPU_KVCACHE_SPACE_ENV
from cluster.testing.checkpoint_writer import make_checkpoint
from tests.ray_session import RaySession

torch.set_num_threads(2)
# The suite runs many engines on this one host (Ray workers inherit it): a quarter of the 1 GiB default each.
os.environ.setdefault(CPU_KVCACHE_SPACE_ENV, "0.25")
# Without CUDA, Triton kernels run in Triton's interpreter (chosen when a kernel is decorated, so
# before any test imports one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).parent
TIERS = ("unit", "integration", "e2e")
_RAY_GUARD = pytest.StashKey[tuple[bool, object]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        path = Path(item.path)
        tier = path.relative_to(TESTS).parts[0] if TESTS in path.parents else None
        if tier in TIERS:
            item.add_marker(tier)
        if "expert_nodes" in getattr(item, "fixturenames", ()):
            item.add_marker("slow")
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _no_ray(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a unit test started Ray: unit tests run without it (tests that need Ray live in "
                       "tests/integration or tests/e2e)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Unit tests run without Ray: `ray.init` (which every implicit start calls too) refuses from
    their setup to their teardown, and Ray running afterwards fails the test."""
    if item.get_closest_marker("unit") is None:
        return
    ray = sys.modules.get("ray")
    original = ray.init if ray is not None and not ray.is_initialized() else None
    item.stash[_RAY_GUARD] = (_ray_initialized(), original)
    if original is not None:
        ray.init = _no_ray


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        guard = item.stash.get(_RAY_GUARD, None)
        if guard is not None:
            was_up, original = guard
            if original is not None:
                sys.modules["ray"].init = original
            if not was_up and _ray_initialized():
                sys.modules["ray"].shutdown()  # so that the next unit test is checked on its own
                pytest.fail(f"{item.nodeid} started Ray: unit tests run without it")


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_root: Path) -> Path:
    """The tiny preset, fused expert layout, one safetensors file."""
    return make_checkpoint(ckpt_root / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def long_ckpt(ckpt_root: Path) -> Path:
    """The long preset: 262,144 positions (YaRN factor 512 over 512) on one layer and one head."""
    return make_checkpoint(ckpt_root / "long", "long", seed=0)


@pytest.fixture(scope="session")
def make_ckpt(ckpt_root: Path):
    """Factory for variant checkpoints, cached by name within the session."""
    made: dict[str, Path] = {}

    def _make(name: str, **kwargs) -> Path:
        if name not in made:
            made[name] = make_checkpoint(ckpt_root / name, **kwargs)
        return made[name]

    return _make


@pytest.fixture(scope="session")
def ray_session() -> Iterator[RaySession]:
    """The session's Ray cluster and Serve, each started on first use (see tests/ray_session.py)."""
    session = RaySession()
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_cluster(ray_session: RaySession):
    """The session's local Ray cluster (a head node), the driver connected."""
    return ray_session.cluster()


@pytest.fixture(scope="session")
def expert_nodes(ray_session: RaySession) -> int:
    """Worker nodes with one `expert_slot` each on the session's cluster: expert shards on distinct
    nodes. Returns how many."""
    return ray_session.expert_nodes()
