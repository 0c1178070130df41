"""The ray transport's socket data path (cluster/exchange_wire.py), without Ray: frames in every
carried dtype arrive intact, a shard's failure and a dead shard surface as WireError (so the
router re-forms), and a malformed frame closes the connection instead of computing garbage."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch

from cluster.experts.wire import ExchangeClient, ExchangeServer, WireError

H, K = 12, 3


def weighted_sum(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # a stand-in shard: depends on every input, so a mangled byte shows
    masked = torch.where(ids >= 0, weights, torch.zeros_like(weights))  # [n, K]
    return hidden * (masked.sum(-1, keepdim=True) + layer) + ids.clamp(min=0).sum(-1, keepdim=True)


@pytest.fixture
def server():
    s = ExchangeServer(weighted_sum, hidden_size=H, host="127.0.0.1")
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_in_every_dtype(server, dtype):
    gen = torch.Generator().manual_seed(0)
    client = ExchangeClient(("127.0.0.1", server.port), timeout_s=5)
    try:
        for layer, n in ((1, 5), (3, 1), (7, 64)):
            hidden = torch.randn(n, H, generator=gen).to(dtype)
            ids = torch.randint(-1, 16, (n, K), generator=gen)
            weights = torch.rand(n, K, generator=gen)
            client.send(layer, hidden, ids, weights, timeout_s=5)
            out = client.receive(timeout_s=5)
            assert out.dtype == dtype and out.shape == (n, H)
            assert torch.equal(out, weighted_sum(layer, hidden, ids, weights).to(dtype))
    finally:
        client.close()


def test_routers_share_a_server_concurrently(server):
    errors: list[BaseException] = []

    def router(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        client = ExchangeClient(("127.0.0.1", server.port), timeout_s=5)
        try:
            for _ in range(50):
                hidden, ids, weights = torch.randn(4, H, generator=gen), torch.zeros(4, K, dtype=torch.long), \
                    torch.rand(4, K, generator=gen)
                client.send(2, hidden, ids, weights, timeout_s=5)
                assert torch.equal(client.receive(timeout_s=5), weighted_sum(2, hidden, ids, weights))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=router, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_shard_failure_and_dead_shard_raise_wire_error():
    def broken(layer, hidden, ids, weights):
        raise RuntimeError("expert weights missing")

    s = ExchangeServer(broken, hidden_size=H, host="127.0.0.1")
    client = ExchangeClient(("127.0.0.1", s.port), timeout_s=5)
    client.send(0, torch.zeros(2, H), torch.zeros(2, K, dtype=torch.long), torch.ones(2, K), timeout_s=5)
    with pytest.raises(WireError, match="expert weights missing"):
        client.receive(timeout_s=5)
    client.close()
    s.close()
    with pytest.raises(WireError, match="cannot connect"):
        ExchangeClient(("127.0.0.1", s.port), timeout_s=1)


def test_a_shard_that_never_answers_times_out(server):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    client = ExchangeClient(("127.0.0.1", listener.getsockname()[1]), timeout_s=5)
    try:
        client.send(0, torch.zeros(1, H), torch.zeros(1, K, dtype=torch.long), torch.ones(1, K), timeout_s=1)
        with pytest.raises(WireError, match="timed out"):
            client.receive(timeout_s=0.2)
    finally:
        client.close()
        listener.close()


def test_malformed_frame_closes_the_connection(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(struct.pack("<iiiiB", 0, 1, H + 1, K, 0))  # wrong hidden size
        assert raw.recv(1) == b""  # closed without an answer
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        client = ExchangeClient(("127.0.0.1", server.port), timeout_s=5)
        try:
            client.send(0, torch.zeros(1, H, dtype=torch.float64), torch.zeros(1, K, dtype=torch.long),
                        torch.ones(1, K), timeout_s=1)
        finally:
            client.close()
