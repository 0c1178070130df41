"""The services registered by deployments.grpc.registration (as Serve's proxy registers them)
decode what they can and hand the method an `Undecodable` for what they cannot, instead of grpcio
ending the call with UNKNOWN; on a plain grpc.aio server here."""

from __future__ import annotations

import asyncio
import pickle

import grpc
from grpc_health.v1 import health_pb2

from deployments.grpc.registration import Undecodable, add_health_to_server, add_moe_cluster_to_server
from deployments.protos import moe_cluster_pb2 as pb


class Recorder:
    """Answers every unary method with the type of the request it was handed."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def __getattr__(self, name: str):
        async def method(request, context):
            self.requests.append(request)
            if isinstance(request, Undecodable):
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(request.message_type)
                return pb.GenerateResponse() if name == "Generate" else health_pb2.HealthCheckResponse()
            return pb.GenerateResponse(text=type(request).__name__) if name == "Generate" else \
                health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return method


async def _calls(recorder: Recorder) -> list[tuple[grpc.StatusCode, str]]:
    server = grpc.aio.server()
    add_moe_cluster_to_server(recorder, server)
    add_health_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = pb.GenerateRequest(text="Hi").SerializeToString()
            for path, payload in (("/moe_cluster.v1.MoeCluster/Generate", good),
                                  ("/moe_cluster.v1.MoeCluster/Generate", b"\x00\x01\xff"),
                                  ("/grpc.health.v1.Health/Check", b"\xff\xff")):
                try:
                    reply = await channel.unary_unary(path)(payload, timeout=10)
                    results.append((grpc.StatusCode.OK, reply))
                except grpc.aio.AioRpcError as err:
                    results.append((err.code(), err.details()))
    finally:
        await server.stop(0)
    return results


def test_undecodable_bytes_reach_the_method():
    recorder = Recorder()
    (ok, reply), (bad, details), (health, health_details) = asyncio.run(_calls(recorder))
    assert ok == grpc.StatusCode.OK and pb.GenerateResponse.FromString(reply).text == "GenerateRequest"
    assert (bad, details) == (grpc.StatusCode.INVALID_ARGUMENT, "moe_cluster.v1.GenerateRequest")
    assert (health, health_details) == (grpc.StatusCode.INVALID_ARGUMENT, "grpc.health.v1.HealthCheckRequest")
    first, second, third = recorder.requests
    assert isinstance(first, pb.GenerateRequest) and first.text == "Hi"
    assert isinstance(second, Undecodable) and "Error parsing message" in second.reason
    assert isinstance(third, Undecodable)
    assert pickle.loads(pickle.dumps(second)) == second  # the proxy pickles it to the replica
