"""Every gRPC method (moe_cluster.v1.MoeCluster and grpc.health.v1.Health, through Serve's proxy)
fuzzed with random bytes sent raw through a generic call, with random protobuf messages of each
method's request type (built by Hypothesis from the message descriptors), and with oversized
messages: each call ends with one of the status codes docs/OPERATIONS.md documents for it
("gRPC status codes"), and the server goes on answering, its engine idle with every KV block free.

Bounded: a fixed number of examples per method, every generation capped at a few tokens (a
`sampling.max_tokens` appended to raw bytes: protobuf merges a message's repeated occurrences).
`MOE_FUZZ_EXAMPLES=300` for a deeper run."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.protos import moe_cluster_pb2 as pb
from tests.e2e.support import GRPC_APP_MAX, GRPC_PROXY_MAX

FD = descriptor.FieldDescriptor
EXAMPLES = int(os.environ.get("MOE_FUZZ_EXAMPLES", "60"))  # per method and kind (raw bytes, messages)
HEALTH_EXAMPLES = 5  # Watch runs to its deadline each time
MAX_TOKENS, MAX_N = 4, 2
WATCH_DEADLINE_S = 1.5
CODE = grpc.StatusCode

# What a call may end with (docs/OPERATIONS.md, "gRPC status codes").
ANSWERED = {CODE.OK, CODE.INVALID_ARGUMENT, CODE.NOT_FOUND}
UNDECODABLE = {CODE.INVALID_ARGUMENT}  # the bytes are no message of the method's type (deployments.grpc.registration)
HEALTH_WATCH = {CODE.DEADLINE_EXCEEDED}  # a watch streams until the client leaves


def methods() -> list[tuple[str, descriptor.MethodDescriptor]]:
    services = [pb.DESCRIPTOR.services_by_name["MoeCluster"], health_pb2.DESCRIPTOR.services_by_name["Health"]]
    return [(f"/{s.full_name}/{m.name}", m) for s in services for m in s.methods]


METHODS = methods()
IDS = [path.rsplit(".", 1)[-1] for path, _ in METHODS]


def is_health(method: descriptor.MethodDescriptor) -> bool:
    return method.containing_service.full_name == "grpc.health.v1.Health"


def message_class(method: descriptor.MethodDescriptor, side: str = "input") -> type[Message]:
    module = health_pb2 if is_health(method) else pb
    return getattr(module, getattr(method, f"{side}_type").name)


WORDS = st.sampled_from(["", "user", "system", "assistant", "tool", "auto", "none", "required", "high", "medium",
                         "moe_cluster.v1.MoeCluster", "Hi", "f", "{}", '{"type": "object"}'])
SMALL = st.integers(0, 40)


def scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kinds: dict[int, st.SearchStrategy[Any]] = {
        FD.TYPE_STRING: st.text(max_size=30) | WORDS,
        FD.TYPE_BOOL: st.booleans(),
        FD.TYPE_BYTES: st.binary(max_size=64),
        FD.TYPE_UINT32: SMALL | st.integers(0, 2**32 - 1),
        FD.TYPE_INT32: SMALL | st.integers(-(2**31), 2**31 - 1),
        FD.TYPE_UINT64: SMALL | st.integers(0, 2**64 - 1),
        FD.TYPE_FLOAT: st.floats(width=32) | st.floats(0, 2, width=32),
        FD.TYPE_ENUM: st.sampled_from([v.number for v in field.enum_type.values]) if field.enum_type else SMALL,
    }
    if field.type not in kinds:
        raise AssertionError(f"no strategy for {field.full_name} (type {field.type})")
    return kinds[field.type]


def messages(desc: descriptor.Descriptor, cls: Callable[..., Message], depth: int = 0) -> st.SearchStrategy[Message]:
    """Random messages of `desc`: each field set or not, repeated fields short, nesting bounded."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            one = st.nothing()  # a map: its entries are drawn below
        elif field.message_type is not None:
            if depth >= 3:
                continue
            nested_cls = _nested_class(cls, field)
            one: st.SearchStrategy[Any] = messages(field.message_type, nested_cls, depth + 1)
        else:
            one = scalar(field)
        repeated = field.is_repeated
        if repeated and field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
            optional[field.name] = st.dictionaries(scalar(key), scalar(value), max_size=4)
            continue
        optional[field.name] = st.lists(one, max_size=4) if repeated else one
    return st.fixed_dictionaries({}, optional=optional).map(lambda kwargs: cls(**kwargs))


def _nested_class(cls: Callable[..., Message], field: descriptor.FieldDescriptor) -> type[Message]:
    instance = cls()
    container = getattr(instance, field.name)
    return type(container.add()) if field.is_repeated else type(container)


def clamp(request: Message) -> Message:
    """At most MAX_N generations of at most MAX_TOKENS tokens (an unset max_tokens means the rest of
    the context)."""
    if "sampling" in request.DESCRIPTOR.fields_by_name:
        sampling = request.sampling  # type: ignore[attr-defined]
        if not sampling.HasField("max_tokens") or sampling.max_tokens > MAX_TOKENS:
            sampling.max_tokens = MAX_TOKENS
        if sampling.HasField("n") and sampling.n > MAX_N:
            sampling.n = MAX_N
    return request


def clamp_suffix(method: descriptor.MethodDescriptor) -> bytes:
    """Appended to raw bytes: if they decode, the request's max_tokens is MAX_TOKENS."""
    cls = message_class(method)
    if "sampling" not in cls.DESCRIPTOR.fields_by_name:
        return b""
    return cls(sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS)).SerializeToString()


def unknown_field(size: int) -> bytes:
    """A valid encoding of any message: field 1000, length-delimited, unknown to every request type."""
    tag, length, n = (1000 << 3) | 2, bytearray(), size
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    key = bytearray()
    while True:
        byte, tag = tag & 0x7F, tag >> 7
        key.append(byte | (0x80 if tag else 0))
        if not tag:
            break
    return bytes(key) + bytes(length) + b"x" * size


def call(channel: grpc.Channel, path: str, method: descriptor.MethodDescriptor, payload: bytes,
         metadata: list[tuple[str, str]]) -> tuple[grpc.StatusCode, str]:
    """Sends `payload` as the raw request; the call's final status."""
    timeout = WATCH_DEADLINE_S if method.name == "Watch" else 60
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path)(payload, metadata=metadata, timeout=timeout):
                pass
        else:
            channel.unary_unary(path)(payload, metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return CODE.OK, ""


def decodes(method: descriptor.MethodDescriptor, payload: bytes) -> bool:
    try:
        message_class(method).FromString(payload)
    except DecodeError:
        return False
    return True


def expected(method: descriptor.MethodDescriptor, payload: bytes, keyed: bool) -> set[grpc.StatusCode]:
    if not keyed and not is_health(method):
        return {CODE.UNAUTHENTICATED}  # the key is checked first: no answer tells a stranger more
    if not decodes(method, payload):
        return UNDECODABLE
    if method.name == "Watch":
        return HEALTH_WATCH
    return ANSWERED


def fuzz(examples: int, strategy: st.SearchStrategy[Any], check: Callable[[Any], None]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: Any) -> None:
        check(value)

    run()


@pytest.fixture(scope="module")
def channel(server):
    ch = server.channel()
    yield ch
    ch.close()


def answers_normally(server, channel: grpc.Channel) -> None:
    method = pb.DESCRIPTOR.services_by_name["MoeCluster"].methods_by_name["Generate"]
    request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(max_tokens=1, temperature=0))
    reply = channel.unary_unary("/moe_cluster.v1.MoeCluster/Generate",
                                response_deserializer=pb.GenerateResponse.FromString)(
        request.SerializeToString(), metadata=server.metadata(), timeout=60)
    assert method.output_type.name == "GenerateResponse" and len(reply.token_ids) == 1
    server.wait_idle()


@pytest.mark.parametrize("path, method", METHODS, ids=IDS)
def test_random_bytes(server, channel, path, method):
    suffix = clamp_suffix(method)
    examples = HEALTH_EXAMPLES if method.name == "Watch" else EXAMPLES
    seen = set()

    def check(value: tuple[bytes, bool]) -> None:
        raw, keyed = value
        payload = raw + suffix
        code, details = call(channel, path, method, payload, server.metadata(key=None if not keyed else "test-key-1"))
        want = expected(method, payload, keyed)
        assert code in want, (path, payload[:200], code, details)
        if want is UNDECODABLE:
            assert f"no {message_class(method).DESCRIPTOR.full_name} message" in details, details
        seen.add(decodes(method, payload))

    fuzz(examples, st.tuples(st.binary(max_size=300), st.booleans()), check)
    assert seen == {True, False}, "want both undecodable and decodable payloads"
    answers_normally(server, channel)


@pytest.mark.parametrize("path, method", METHODS, ids=IDS)
def test_random_messages(server, channel, path, method):
    cls = message_class(method)
    examples = HEALTH_EXAMPLES if method.name == "Watch" else EXAMPLES

    def check(request: Message) -> None:
        payload = clamp(request).SerializeToString()
        code, details = call(channel, path, method, payload, server.metadata())
        assert code in expected(method, payload, True), (path, request, code, details)

    fuzz(examples, messages(cls.DESCRIPTOR, cls), check)
    answers_normally(server, channel)


@pytest.mark.parametrize("path, method", METHODS, ids=IDS)
def test_oversized_messages(server, channel, path, method):
    # Above the ingress's limit, below the proxy's: the ingress refuses it by name (the health
    # service reads nothing but a service name and checks no size of its own).
    mid = unknown_field(GRPC_APP_MAX + 1000)
    code, details = call(channel, path, method, mid, server.metadata())
    if is_health(method):
        assert code in (HEALTH_WATCH if method.name == "Watch" else {CODE.OK}), (code, details)
    else:
        assert code == CODE.INVALID_ARGUMENT and "grpc_max_message_bytes" in details, (code, details)
    # Above the proxy's transport limit: gRPC refuses it before any method runs.
    big = unknown_field(GRPC_PROXY_MAX + 1000)
    for keyed in (True, False):
        code, details = call(channel, path, method, big, server.metadata(key="test-key-1" if keyed else None))
        assert code == CODE.RESOURCE_EXHAUSTED, (code, details)
    answers_normally(server, channel)
