"""The services' registration in Serve's gRPC proxy (entries of `grpc_servicer_functions`), with
request decoding that never fails the call inside grpcio.

The generated `add_*Servicer_to_server` functions decode each request with the message type's
`FromString` in the proxy; bytes that are no such message make grpcio end the call with UNKNOWN
("Unexpected DecodeError") before the ingress sees it. Registered through these functions instead,
such bytes decode to `Undecodable`, which the proxy forwards like any request, and the ingress
answers INVALID_ARGUMENT (after the key check, like every other bad request).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import descriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from deployments.protos import moe_cluster_pb2


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are no message of the method's type (crosses to the replica pickled)."""

    message_type: str
    reason: str


def tolerant_decoder(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Undecodable(message.DESCRIPTOR.full_name, str(exc))
    return decode


def add_service(servicer: Any, server: Any, service: descriptor.ServiceDescriptor, messages: ModuleType) -> None:
    """What a generated `add_*Servicer_to_server` does for `service`, with tolerant decoding."""
    handlers = {}
    for method in service.methods:
        request, response = (getattr(messages, t.name) for t in (method.input_type, method.output_type))
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not served")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=tolerant_decoder(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def add_moe_cluster_to_server(servicer: Any, server: Any) -> None:
    add_service(servicer, server, moe_cluster_pb2.DESCRIPTOR.services_by_name["MoeCluster"], moe_cluster_pb2)


def add_health_to_server(servicer: Any, server: Any) -> None:
    add_service(servicer, server, health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2)
