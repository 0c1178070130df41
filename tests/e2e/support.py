"""Shared by the e2e tests: the served applications, their limits, and a handle on the server.

One Serve instance on the session's Ray cluster (tests/ray_session.py), on free ports, with these
applications side by side (route prefixes over HTTP, the `application` metadata over gRPC), each
deployed when a test first uses it (`Server.app`):

- main   (/)        the tiny checkpoint: OpenAI API, parity, bad input, cancellation
- think  (/think)   scripted: `[THINK]Let me think[/THINK]The answer`
- tool   (/tool)    scripted: `[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`
- limits (/limits)  the tiny checkpoint with 2 requests in flight at most: backpressure; small
                    prefill chunks (long prompts beside a decoding stream)
- routing (/routing) the tiny checkpoint on two engine replicas with small KV pools: KV-aware routing

Only `main` runs a VisionEncoder deployment (batching window widened so that two concurrent
requests share a batch); its image URLs may come from 127.0.0.1 (a test server) only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx2 as httpx

from cluster.model.tokenizer import Tokenizer
from deployments.config import AppConfig
from tests.ray_session import PROXY_GRPC_MAX_MESSAGE_BYTES, RaySession, free_port  # noqa: F401 - used from here too

KEY = "test-key-1"
MAX_MODEL_LEN = 1024
MAX_BODY = 256 * 1024
GRPC_PROXY_MAX = PROXY_GRPC_MAX_MESSAGE_BYTES  # the proxy's transport limit
GRPC_APP_MAX = 512 * 1024  # each app's own check, below the proxy's
LIMIT = 2  # max_ongoing_requests of the limits app
LIMITS_ENGINE = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": 64}
ROUTING_ENGINE = {"max_model_len": 4096, "num_kv_blocks": 320}  # one long prompt is 30% of a replica's KV
MAX_IMAGES = 2
MAX_IMAGE_BYTES = 100_000
MAIN_IMAGES = {"max_images_per_request": MAX_IMAGES, "max_image_bytes": MAX_IMAGE_BYTES,
               "allowed_hosts": ["127.0.0.1", "169.254.169.254"], "allowed_networks": ["127.0.0.1/32"]}
MAIN_VISION = {"num_cpus": 0, "batch_wait_s": 0.5}
THINK_TEXT, ANSWER_TEXT = "Let me think", "The answer"
TOOL_NAME, TOOL_ARGS = "get_weather", '{"city": "Paris"}'


@dataclass
class Server:
    http_port: int
    grpc_port: int
    apps: dict[str, AppConfig]
    model_dirs: dict[str, Path]
    ray: RaySession
    deployed: dict[str, int] = field(default_factory=dict)  # app name: the Serve generation it runs in

    def app(self, name: str = "main") -> AppConfig:
        """The application `name`, deployed if it is not yet (or no longer: another module's Serve
        replaced this one's) and running."""
        from deployments import launch
        from deployments.app import grpc_options, http_options

        main = self.apps["main"]
        generation = self.ray.serve(http_options(main), grpc_options(main))
        if self.deployed.get(name) != generation:
            launch.deploy([self.apps[name]])
            self.deployed[name] = generation
        return self.apps[name]

    def remove(self, name: str) -> None:
        """Deletes the application `name` (if it runs) and forgets its config."""
        from ray import serve

        config = self.apps.pop(name)
        generation = self.deployed.pop(name, None)
        if generation is not None and self.ray.serving(generation):
            serve.delete(config.app_name)

    def url(self, path: str, app: str = "main") -> str:
        prefix = self.app(app).route_prefix.rstrip("/")
        return f"http://127.0.0.1:{self.http_port}{prefix}{path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def metadata(self, app: str = "main", key: str | None = KEY) -> list[tuple[str, str]]:
        md = [("application", self.app(app).app_name)]
        return md + ([("authorization", f"Bearer {key}")] if key else [])

    def channel(self) -> grpc.Channel:
        self.app("main")  # the proxy, and an application for the health and reflection services to name
        return grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=[
            ("grpc.max_send_message_length", 8 * 2**20), ("grpc.max_receive_message_length", 8 * 2**20)])

    def stats(self, app: str = "main") -> dict:
        r = httpx.get(self.url("/v1/engine/stats", app), headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, app: str = "main", timeout_s: float = 20.0) -> dict:
        """Engine stats once nothing runs or waits and every KV block is free again."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.stats(app)
            if s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_used"] == 0:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"engine of {app!r} not idle after {timeout_s}s: {s}")
            time.sleep(0.1)


def scripts(tokenizer: Tokenizer) -> dict[str, list[int]]:
    t = tokenizer
    think = [t.think_id, *t.encode_text(THINK_TEXT, bos=False), t.end_think_id, *t.encode_text(ANSWER_TEXT, bos=False)]
    tool = [t.tool_calls_id, *t.encode_text(TOOL_NAME, bos=False), t.args_id, *t.encode_text(TOOL_ARGS, bos=False)]
    for script in (think, tool):
        assert len(set(script)) == len(script), "a scripted checkpoint needs one successor per token"
    return {"think": think, "tool": tool}


