"""The session's server: see tests/e2e/support.py for the applications it runs.

Serve starts on the session's Ray cluster (tests/conftest.py) for the first e2e test that needs
it, and each application is deployed when a test first uses it (`Server.app`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.model.tokenizer import Tokenizer
from deployments.config import AppConfig
from tests.e2e.support import (
    GRPC_APP_MAX,
    KEY,
    LIMIT,
    LIMITS_ENGINE,
    MAIN_IMAGES,
    MAIN_VISION,
    MAX_BODY,
    MAX_MODEL_LEN,
    ROUTING_ENGINE,
    Server,
    free_port,
    scripts,
)
from tests.ray_session import RaySession


@pytest.fixture(scope="session")
def server(ray_session: RaySession, tiny_ckpt: Path, make_ckpt) -> Server:
    script = scripts(Tokenizer.from_model_dir(tiny_ckpt))
    dirs = {"main": tiny_ckpt, "think": make_ckpt("think", script=script["think"]),
            "tool": make_ckpt("tool", script=script["tool"]), "limits": tiny_ckpt}
    http_port, grpc_port = free_port(), free_port()
    common = dict(api_keys=[KEY], http_port=http_port, grpc_port=grpc_port, grpc_reflection=True,
                  ingress_num_cpus=0, engine_num_cpus=0, max_body_bytes=MAX_BODY,
                  grpc_max_message_bytes=GRPC_APP_MAX, engine={"max_model_len": MAX_MODEL_LEN})
    no_vision = {"num_replicas": 0}
    apps = {
        "main": AppConfig(model=str(dirs["main"]), app_name="main", route_prefix="/", images=MAIN_IMAGES,
                          vision=MAIN_VISION, **common),
        "think": AppConfig(model=str(dirs["think"]), app_name="think", route_prefix="/think", vision=no_vision,
                           **common),
        "tool": AppConfig(model=str(dirs["tool"]), app_name="tool", route_prefix="/tool", vision=no_vision, **common),
        "limits": AppConfig(model=str(dirs["limits"]), app_name="limits", route_prefix="/limits",
                            max_ongoing_requests=LIMIT, max_queued_requests=LIMIT, vision=no_vision,
                            **{**common, "engine": LIMITS_ENGINE}),
        "routing": AppConfig(model=str(dirs["main"]), app_name="routing", route_prefix="/routing", vision=no_vision,
                             num_engine_replicas=2, **{**common, "engine": ROUTING_ENGINE}),
    }
    return Server(http_port, grpc_port, apps, dirs, ray_session)
