"""The Ingress deployment: the HTTP app (built per replica from the config) and the gRPC methods
that Serve's gRPC proxy calls by RPC name, over one IngressCore."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.frontend.ingress_core import IngressCore
from deployments.grpc.service import GrpcMethods


@serve.ingress()
class Ingress(GrpcMethods):
    def __init__(self, engine: object, config: AppConfig, vision: object | None = None) -> None:
        self.config = config
        self.core = IngressCore(engine, config, vision)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_http_app(lambda: self.core, self.config)

    def process_stats(self) -> dict[str, int]:
        """This replica's memory (RSS, peak RSS), decoded image pixels held and prompt tokens in
        flight, through a DeploymentHandle (`serve.get_app_handle(app).process_stats.remote()`)."""
        from deployments.frontend.images import memory_stats

        return {**memory_stats(), "image_pixels_held": self.core.images.budget.used,
                "prompt_tokens_in_flight": self.core.prompt_budget.used}
