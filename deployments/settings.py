"""Settings of the serving layers added around the engine: images at the ingress, the vision
encoder deployment, and KV-aware request routing. Nested in AppConfig (deployments/config.py) as
`images`, `vision` and `routing`; light (pydantic only), so the ingress imports it freely."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
)

# Formats the ingress decodes (Pillow plugin names). Everything else is refused before decoding.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ImageSettings(BaseModel):
    """What the ingress accepts in `image_url` / `image` message parts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_images_per_request: PositiveInt = Field(8, description="image parts in one request, all messages together")
    max_image_bytes: PositiveInt = Field(10 * 2**20, description="encoded bytes of one image (data URL or fetched)")
    max_image_pixels: PositiveInt = Field(25_000_000, description="width x height of one image as sent, checked "
                                                                  "from its header before decoding")
    formats: tuple[str, ...] = Field(DEFAULT_IMAGE_FORMATS, description="accepted formats (Pillow names)")
    allowed_hosts: tuple[str, ...] = Field((), description="hosts http(s) image URLs may name: `host`, `host:port` "
                                                           "or `*.domain`; empty: only data: URLs")
    allowed_networks: tuple[str, ...] = Field(
        (), description="CIDRs exempt from the refusal of loopback / private addresses (e.g. `127.0.0.1/32` in "
                        "tests, an internal image store); link-local and metadata addresses are never exempt")
    fetch_timeout_s: PositiveFloat = Field(10.0, description="whole fetch of one image URL, redirects included")
    max_redirects: NonNegativeInt = Field(3, description="redirects followed, each to the same host only")

    @field_validator("formats", "allowed_hosts", "allowed_networks", mode="before")
    @classmethod
    def _listish(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one image format must be accepted")
        return tuple(f.upper() for f in value)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for host in value:
            host = host.strip().lower()
            if not host or "/" in host or "@" in host or host.startswith("*") and not host.startswith("*."):
                raise ValueError(f"allowed host {host!r} must be `host`, `host:port` or `*.domain`")
            out.append(host)
        return tuple(out)

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed network {net!r} is not a CIDR: {exc}") from None
        return value


class VisionSettings(BaseModel):
    """The VisionEncoder deployment: Pixtral tower + projector, batching images of concurrent
    requests into one tower call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: NonNegativeInt = Field(1, description="0: no vision deployment (image requests get 400)")
    # with the ingress (0.5) and an engine server (1), the default app fits a 2-CPU machine
    num_cpus: NonNegativeFloat = 0.5
    num_gpus: NonNegativeFloat = 0.0
    max_batch_size: PositiveInt = Field(16, description="requests (each with its images) in one encoder batch")
    batch_wait_s: NonNegativeFloat = Field(0.01, description="how long a batch waits for more requests")
    timeout_s: PositiveFloat = Field(60.0, description="one request's wait for its embeddings")


class RoutingSettings(BaseModel):
    """How ingress replicas pick an engine replica (the request router)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_aware: bool = Field(True, description="route to the replica with the most free KV blocks "
                                             "(deployments.serving.request_router); false: Serve's power of two "
                                             "choices")
    stats_period_s: PositiveFloat = Field(0.5, description="how often engine replicas report their KV state")
    stats_timeout_s: PositiveFloat = Field(5.0, description="a report slower than this is dropped")
    stale_after_s: PositiveFloat = Field(3.0, description="reports older than this count as unknown")
    prefix_aware: bool = Field(True, description="with kv_aware: prefer the replica this handle sent the longest "
                                                 "prefix of the prompt (its prefix cache likely holds it)")
    prefix_max_imbalance: NonNegativeInt = Field(
        8, description="requests in flight that replica may have above the least busy one and still be preferred")
