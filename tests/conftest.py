"""Shared fixtures: checkpoints are written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.testing.checkpoint_writer import make_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_root: Path) -> Path:
    """The tiny preset, fused expert layout, one safetensors file."""
    return make_checkpoint(ckpt_root / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def make_ckpt(ckpt_root: Path):
    """Factory for variant checkpoints, cached by name within the session."""
    made: dict[str, Path] = {}

    def _make(name: str, **kwargs) -> Path:
        if name not in made:
            made[name] = make_checkpoint(ckpt_root / name, **kwargs)
        return made[name]

    return _make
