"""The ray transport's socket data path (cluster/experts/wire.py), without Ray: frames in every
carried dtype arrive intact, a shard's failure and a dead shard surface as WireError (so the
engine re-forms), a malformed or oversize frame closes the connection instead of computing, and
a peer without the group's secret (no handshake, a well-formed frame straight away, a wrong HMAC,
silence) gets nothing computed while the shard goes on answering its engines."""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import socket
import struct
import threading
import time

import pytest
import torch

from cluster.experts.wire import ExchangeClient, ExchangeServer, FrameLimits, WireError, WireSecret

H, K = 12, 3


def weighted_sum(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # a stand-in shard: depends on every input, so a mangled byte shows
    masked = torch.where(ids >= 0, weights, torch.zeros_like(weights))  # [n, K]
    return hidden * (masked.sum(-1, keepdim=True) + layer) + ids.clamp(min=0).sum(-1, keepdim=True)


SECRET = WireSecret(b"k" * 32)
LIMITS = FrameLimits(hidden_size=H, max_top_k=K, max_rows=64)


class CountingCompute:
    """weighted_sum that counts its calls: a refused peer must not reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return weighted_sum(layer, hidden, ids, weights)


@pytest.fixture
def compute() -> CountingCompute:
    return CountingCompute()


@pytest.fixture
def server(compute):
    s = ExchangeServer(compute, SECRET, LIMITS, host="127.0.0.1", handshake_timeout_s=1.0)
    yield s
    s.close()


def connect(server: ExchangeServer, secret: WireSecret = SECRET) -> ExchangeClient:
    return ExchangeClient(("127.0.0.1", server.port), secret, timeout_s=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_in_every_dtype(server, dtype):
    gen = torch.Generator().manual_seed(0)
    client = connect(server)
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


def test_engines_share_a_server_concurrently(server):
    errors: list[BaseException] = []

    def engine(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        client = connect(server)
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

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_shard_failure_and_dead_shard_raise_wire_error():
    def broken(layer, hidden, ids, weights):
        raise RuntimeError("expert weights missing")

    s = ExchangeServer(broken, SECRET, LIMITS, host="127.0.0.1")
    client = connect(s)
    client.send(0, torch.zeros(2, H), torch.zeros(2, K, dtype=torch.long), torch.ones(2, K), timeout_s=5)
    with pytest.raises(WireError, match="expert weights missing"):
        client.receive(timeout_s=5)
    client.close()
    s.close()
    with pytest.raises(WireError, match="cannot connect"):
        ExchangeClient(("127.0.0.1", s.port), SECRET, timeout_s=1)


def test_a_shard_that_never_answers_times_out():
    release = threading.Event()

    def stuck(layer, hidden, ids, weights):
        release.wait(10)
        return hidden

    s = ExchangeServer(stuck, SECRET, LIMITS, host="127.0.0.1")
    client = connect(s)
    try:
        client.send(0, torch.zeros(1, H), torch.zeros(1, K, dtype=torch.long), torch.ones(1, K), timeout_s=1)
        with pytest.raises(WireError, match="timed out"):
            client.receive(timeout_s=0.2)
    finally:
        release.set()
        client.close()
        s.close()


# -- a raw peer, speaking the documented protocol byte by byte (not through the code under test) --

HELLO = b"MOEX\x01"


def frame(n: int = 1, h: int = H, k: int = K, layer: int = 0) -> bytes:
    """A well-formed request frame: header, then float32 rows, int64 ids, float32 weights."""
    return (struct.pack("<iiiiB", layer, n, h, k, 0) + torch.ones(n, h).numpy().tobytes()
            + torch.zeros(n, k, dtype=torch.int64).numpy().tobytes() + torch.ones(n, k).numpy().tobytes())


def read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    sock.settimeout(timeout_s)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def raw_handshake(sock: socket.socket, key: bytes) -> bytes | None:
    """Answers the server's nonce with HMAC-SHA256(key, "client" || nonces); the server's proof,
    or None when the server closed instead."""
    sock.settimeout(5)
    greeting = b""
    while len(greeting) < len(HELLO) + 32:
        greeting += sock.recv(len(HELLO) + 32 - len(greeting))
    assert greeting.startswith(HELLO)
    nonce, mine = greeting[len(HELLO):], b"c" * 32
    sock.sendall(mine + hmac.new(key, b"client" + nonce + mine, hashlib.sha256).digest())
    proof = b""
    while len(proof) < 32:
        try:
            chunk = sock.recv(32 - len(proof))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        proof += chunk
    return proof


KEY = b"k" * 32  # SECRET's key


def exchange_works(client: ExchangeClient, layer: int = 4) -> None:
    hidden, ids, weights = torch.randn(3, H), torch.randint(0, 16, (3, K)), torch.rand(3, K)
    client.send(layer, hidden, ids, weights, timeout_s=5)
    assert torch.equal(client.receive(timeout_s=5), weighted_sum(layer, hidden, ids, weights))


def test_a_peer_without_the_secret_gets_nothing_and_engines_are_still_served(server, compute):
    engine = connect(server)  # an engine connected before the strangers came
    exchange_works(engine)
    assert compute.calls == 1
    # 1. A well-formed exchange frame straight away: parsed as a handshake answer, refused.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(frame(n=4))
        answer = read_until_closed(raw)
        assert answer.startswith(HELLO) and len(answer) == len(HELLO) + 32  # the greeting, then closed: no rows
    # 2. A handshake with the wrong key (a well-formed HMAC of another secret), then a frame.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        assert raw_handshake(raw, b"x" * 32) is None  # closed instead of a proof
        try:
            raw.sendall(frame())
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_until_closed(raw) == b""
    # 3. A client of another group.
    with pytest.raises(WireError, match="refused the handshake"):
        connect(server, WireSecret(b"y" * 32))
    # 4. Silence past the handshake timeout.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        assert len(read_until_closed(raw)) == len(HELLO) + 32
    assert compute.calls == 1  # nothing was computed for any of them
    deadline = time.monotonic() + 5
    while server.refused < 4:
        assert time.monotonic() < deadline, f"refused {server.refused} of 4 strangers"
        time.sleep(0.01)
    # The engine's connection and new ones are served as before.
    exchange_works(engine, layer=5)
    fresh = connect(server)
    exchange_works(fresh, layer=6)
    engine.close()
    fresh.close()
    assert (server.accepted, server.refused, compute.calls) == (2, 4, 3)


def test_a_proven_peer_passes_the_documented_handshake(server, compute):
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        greeting = b""
        raw.settimeout(5)
        while len(greeting) < len(HELLO) + 32:
            greeting += raw.recv(64)
        nonce, mine = greeting[len(HELLO):], b"m" * 32
        raw.sendall(mine + hmac.new(KEY, b"client" + nonce + mine, hashlib.sha256).digest())
        assert raw.recv(32) == hmac.new(KEY, b"server" + nonce + mine, hashlib.sha256).digest()  # mutual
        raw.sendall(frame(n=2))
        status = raw.recv(5)
        assert status == struct.pack("<Bi", 0, 0)
    assert compute.calls == 1


def test_a_server_without_the_secret_is_refused_by_the_client():
    """Mutual: a rogue listener that takes any answer and sends a made-up proof gets no rows."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def rogue() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(HELLO + b"n" * 32)
            got.append(conn.recv(64))
            conn.sendall(b"p" * 32)
            conn.settimeout(5)
            got.append(conn.recv(1024))  # what the client sends next: nothing

    t = threading.Thread(target=rogue)
    t.start()
    with pytest.raises(WireError, match="does not hold the group's secret"):
        ExchangeClient(("127.0.0.1", listener.getsockname()[1]), SECRET, timeout_s=5)
    t.join(timeout=10)
    listener.close()
    assert got[1] == b""  # the client closed without sending a frame


def test_malformed_and_oversize_frames_close_the_connection(server, compute):
    for bad in (struct.pack("<iiiiB", 0, 1, H + 1, K, 0),  # wrong hidden size
                struct.pack("<iiiiB", 0, 1, H, K, 9),  # unknown dtype
                struct.pack("<iiiiB", 0, LIMITS.max_rows + 1, H, K, 0),  # more rows than an engine step holds
                struct.pack("<iiiiB", 0, 2**31 - 1, H, K, 0),  # ~100 GB claimed: refused before allocating
                struct.pack("<iiiiB", 0, 1, H, K + 1, 0),  # more experts per token than the model routes
                struct.pack("<iiiiB", 0, -1, H, K, 0)):
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            assert raw_handshake(raw, KEY) is not None
            raw.sendall(bad)
            assert read_until_closed(raw) == b""  # closed without an answer
    assert compute.calls == 0
    client = connect(server)  # and the shard serves on
    exchange_works(client)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        client.send(0, torch.zeros(1, H, dtype=torch.float64), torch.zeros(1, K, dtype=torch.long),
                    torch.ones(1, K), timeout_s=1)
    client.close()


def test_the_secret_never_shows(server, caplog):
    key = b"\x01\x02secret-key-bytes\xfe\xff" * 2
    secret = WireSecret(key)
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"s": secret})):
        assert "secret-key" not in text and key.hex() not in text and "WireSecret(<hidden>)" in text
    again = pickle.loads(pickle.dumps(secret))  # travels to shards and engines
    assert again.mac(b"a", b"b", b"c") == secret.mac(b"a", b"b", b"c") != WireSecret(b"z" * 32).mac(b"a", b"b", b"c")
    with pytest.raises(ValueError, match="16 bytes"):
        WireSecret(b"short")
    with caplog.at_level(logging.DEBUG):
        s = ExchangeServer(weighted_sum, secret, LIMITS, host="127.0.0.1")
        with socket.create_connection(("127.0.0.1", s.port)) as raw:
            raw_handshake(raw, b"x" * 32)
        with pytest.raises(WireError) as failed:
            ExchangeClient(("127.0.0.1", s.port), WireSecret(b"w" * 32), timeout_s=5)
        deadline = time.monotonic() + 5
        while s.refused < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.close()
    assert "dropped peer" in caplog.text
    for text in (caplog.text, str(failed.value)):
        assert "secret-key" not in text and key.hex() not in text and repr(key) not in text
