"""The Ingress deployment: the HTTP app (built per replica from the config) and the gRPC methods
that Serve's gRPC proxy calls by RPC name, over one IngressCore."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.frontend.drain import DrainWatch
from deployments.frontend.ingress_core import IngressCore
from deployments.grpc.service import GrpcMethods


@serve.ingress()
class Ingress(GrpcMethods):
    def __init__(self, engine: object, config: AppConfig, vision: object | None = None) -> None:
        self.config = config
        self.core = IngressCore(engine, config, vision)
        admission = self.core.admission
        # A graceful stop of `moe-cluster serve` (SIGTERM) tells this replica to refuse new requests.
        self._drain = DrainWatch(config.app_name, serve.get_replica_context().replica_id.unique_id,
                                 lambda: admission.in_flight, admission.drain)

    def __del__(self) -> None:
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.stop()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_http_app(lambda: self.core, self.config)

    def process_stats(self) -> dict[str, int]:
        """This replica's memory (RSS, peak RSS), decoded image pixels held and prompt tokens in
        flight, through a DeploymentHandle (`serve.get_app_handle(app).process_stats.remote()`)."""
        from deployments.frontend.images import memory_stats

        return {**memory_stats(), "image_pixels_held": self.core.images.budget.used,
                "prompt_tokens_in_flight": self.core.prompt_budget.used}
