"""The `ray` transport's data path: one persistent TCP connection per (engine, shard), framed
tensors, no Ray in the loop. Ray actor calls stay for control (start, address, ping, stats,
replacement): a plain actor call costs milliseconds here, a socket round trip tens of
microseconds, and a decode step makes one exchange per MoE layer.

A connection first proves that both ends hold the group's secret (`WireSecret`, made by the
registry), before the server parses a single frame: the server sends a fresh nonce, the client
answers with its own nonce and HMAC-SHA256(secret, "client" || both nonces), the server checks it
in constant time and answers HMAC(secret, "server" || both nonces), which the client checks. A
peer that fails the proof, stays silent past the handshake timeout, or sends a frame that does not
parse or exceeds the `FrameLimits` is dropped; the server goes on serving its other connections.

A request frame is a header `<iiiiB` (layer, rows n, hidden size H, top-k K, dtype code) then
the hidden rows `[n, H]` in that dtype, the expert ids `[n, K]` int64 and the weights `[n, K]`
float32; the answer is the shard's weighted partial sums `[n, H]` in the same dtype, preceded by a
status byte (0: ok, 1: the shard failed; then a UTF-8 message of the length that follows).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<iiiiB")
_STATUS = struct.Struct("<Bi")  # status, error message bytes
_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_HELLO = b"MOEX\x01"  # the server's greeting (protocol version 1), then its nonce
_NONCE_BYTES = 32
_MAC_BYTES = hashlib.sha256().digest_size
MAX_ERROR_BYTES = 4096  # a shard's failure message, as sent and as accepted
MAX_PENDING_HANDSHAKES = 64  # connections not yet proven; more are closed at once


class WireError(ConnectionError):
    """The connection broke, timed out, failed the handshake or carried a frame that does not
    parse or exceeds the limits."""


class WireSecret:
    """The group's shared key for the handshake. Its repr and str never show the key (specs,
    actors and log lines that hold one stay safe to print)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a wire secret needs at least 16 bytes")
        self._key = bytes(key)

    @classmethod
    def generate(cls) -> WireSecret:
        return cls(secrets.token_bytes(32))

    def mac(self, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
        return hmac.new(self._key, role + server_nonce + client_nonce, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "WireSecret(<hidden>)"

    def __reduce__(self) -> tuple[type[WireSecret], tuple[bytes]]:  # travels to shards and engines (Ray)
        return WireSecret, (self._key,)


@dataclass(frozen=True)
class FrameLimits:
    """What a shard accepts in one request frame; anything else is refused before a byte of its
    payload is read or allocated. `max_rows` is an engine step's tokens (max_num_batched_tokens)."""

    hidden_size: int
    max_top_k: int
    max_rows: int

    def dtype_of(self, n: int, h: int, k: int, code: int) -> torch.dtype:
        """The frame's dtype if its header is within the limits; WireError otherwise."""
        dtype = _DTYPES.get(code)
        if dtype is None or h != self.hidden_size or not 0 <= n <= self.max_rows or not 0 < k <= self.max_top_k:
            raise WireError(f"frame refused: n={n} (max {self.max_rows}) H={h} (expected {self.hidden_size}) "
                            f"K={k} (max {self.max_top_k}) dtype code {code}")
        return dtype


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise WireError("connection closed by the peer")
        got += k
    return buf


def _raw(t: torch.Tensor) -> memoryview:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().data


def _tensor(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0,
            nbytes: int | None = None) -> torch.Tensor:
    nbytes = len(buf) - offset if nbytes is None else nbytes
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, offset=offset, count=nbytes // dtype.itemsize).reshape(shape)


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Scatter-gather send: one system call for the whole frame where the kernel takes it all."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


# -- the handshake ----------------------------------------------------------------------------

def _server_handshake(sock: socket.socket, secret: WireSecret) -> None:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sock.sendall(_HELLO + nonce)
    answer = _recv_exact(sock, _NONCE_BYTES + _MAC_BYTES)
    client_nonce, proof = bytes(answer[:_NONCE_BYTES]), bytes(answer[_NONCE_BYTES:])
    if not hmac.compare_digest(proof, secret.mac(b"client", nonce, client_nonce)):
        raise WireError("the peer does not hold the group's secret")
    sock.sendall(secret.mac(b"server", nonce, client_nonce))


def _client_handshake(sock: socket.socket, secret: WireSecret) -> None:
    hello = _recv_exact(sock, len(_HELLO) + _NONCE_BYTES)
    if hello[:len(_HELLO)] != _HELLO:
        raise WireError("not an exchange server (unexpected greeting)")
    nonce, client_nonce = bytes(hello[len(_HELLO):]), secrets.token_bytes(_NONCE_BYTES)
    sock.sendall(client_nonce + secret.mac(b"client", nonce, client_nonce))
    try:
        proof = bytes(_recv_exact(sock, _MAC_BYTES))
    except WireError:
        raise WireError("the shard refused the handshake (a secret of another group?)") from None
    if not hmac.compare_digest(proof, secret.mac(b"server", nonce, client_nonce)):
        raise WireError("the shard does not hold the group's secret")


# -- the shard's side -------------------------------------------------------------------------

Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExchangeServer:
    """Listens on a free port of `host`; a thread per connection proves the peer (within
    `handshake_timeout_s`), then reads requests and answers them with
    `compute(layer, hidden [n, H], ids [n, K], weights [n, K]) -> [n, H]`."""

    def __init__(self, compute: Compute, secret: WireSecret, limits: FrameLimits, host: str,
                 handshake_timeout_s: float = 10.0) -> None:
        self.compute = compute
        self.limits = limits
        self.handshake_timeout_s = handshake_timeout_s
        self._secret = secret
        self._listener = socket.create_server((host, 0), backlog=64)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._closed = False
        self._pending = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
        self._count = threading.Lock()
        self.accepted = 0  # connections that proved the secret
        self.refused = 0  # connections dropped: handshake failed or timed out, bad or oversize frame
        threading.Thread(target=self._accept, name="exchange-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            if not self._pending.acquire(blocking=False):
                self._refuse(conn, peer, "too many connections in their handshake")
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, peer), name="exchange-conn", daemon=True).start()

    def _refuse(self, conn: socket.socket, peer: object, why: str) -> None:
        with self._count:
            self.refused += 1
        if not self._closed:
            log.warning("exchange server: dropped peer %s: %s", peer, why)
        try:
            conn.close()
        except OSError:
            pass

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            conn.settimeout(self.handshake_timeout_s)
            _server_handshake(conn, self._secret)
            conn.settimeout(None)  # a proven engine may stay idle between steps for as long as it likes
        except (OSError, WireError) as exc:
            self._refuse(conn, peer, f"handshake failed: {exc}")
            return
        finally:
            self._pending.release()
        with self._count:
            self.accepted += 1
        try:
            self._frames(conn)
        except WireError as exc:
            self._refuse(conn, peer, str(exc))
        except OSError as exc:
            if not self._closed and not isinstance(exc, ConnectionResetError):
                log.warning("exchange connection from %s dropped: %s", peer, exc)
        finally:
            conn.close()

    def _frames(self, conn: socket.socket) -> None:
        """Requests until the peer leaves (WireError("connection closed") included: not a fault)."""
        while not self._closed:
            try:
                header = _recv_exact(conn, _HEADER.size)
            except WireError:
                return  # the engine closed its connection between frames
            layer, n, h, k, code = _HEADER.unpack(header)
            dtype = self.limits.dtype_of(n, h, k, code)  # before anything of the payload is read
            hidden_bytes = n * h * dtype.itemsize
            payload = _recv_exact(conn, hidden_bytes + n * k * 12)  # one read for the three arrays
            hidden = _tensor(payload, dtype, (n, h), 0, hidden_bytes)  # [n, H]
            ids = _tensor(payload, torch.int64, (n, k), hidden_bytes, n * k * 8)  # [n, K]
            weights = _tensor(payload, torch.float32, (n, k), hidden_bytes + n * k * 8, n * k * 4)  # [n, K]
            try:
                out = self.compute(layer, hidden, ids, weights).to(dtype)  # [n, H]
            except Exception as exc:  # noqa: BLE001 - the engine hears of it and re-forms
                message = f"{type(exc).__name__}: {exc}".encode()[:MAX_ERROR_BYTES]
                log.exception("shard compute failed for layer %d", layer)
                conn.sendall(_STATUS.pack(1, len(message)) + message)
                continue
            _send_all(conn, [_STATUS.pack(0, 0), _raw(out)])

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not)
        except OSError:
            pass
        self._listener.close()


# -- the engine's side ------------------------------------------------------------------------

class ExchangeClient:
    """One engine's connection to one shard, proven with the group's secret. `send` then
    `receive`: an engine sends to every shard first and then collects, so the shards compute in
    parallel."""

    def __init__(self, address: tuple[str, int], secret: WireSecret, timeout_s: float) -> None:
        where = f"{address[0]}:{address[1]}"
        try:
            self.sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            raise WireError(f"cannot connect to shard at {where}: {exc}") from exc
        try:
            _client_handshake(self.sock, secret)
        except (OSError, WireError) as exc:
            self.sock.close()
            raise WireError(f"handshake with shard at {where} failed: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending: tuple[int, int, torch.dtype] | None = None

    def send(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             timeout_s: float) -> None:
        n, h = hidden.shape  # hidden [n, H], ids / weights [n, K]
        code = _CODES.get(hidden.dtype)
        if code is None:
            raise TypeError(f"the ray transport carries float32, bfloat16 or float16 rows, not {hidden.dtype}")
        self.sock.settimeout(timeout_s)
        try:
            _send_all(self.sock, [_HEADER.pack(layer, n, h, ids.shape[1], code), _raw(hidden),
                                  _raw(ids.to(torch.int64)), _raw(weights.to(torch.float32))])
        except OSError as exc:
            raise WireError(f"send failed: {exc}") from exc
        self._pending = (n, h, hidden.dtype)

    def receive(self, timeout_s: float) -> torch.Tensor:
        if self._pending is None:
            raise WireError("receive without a request in flight")
        n, h, dtype = self._pending
        self._pending = None
        self.sock.settimeout(max(timeout_s, 1e-3))
        try:
            status, length = _STATUS.unpack(_recv_exact(self.sock, _STATUS.size))
            if status != 0:
                if not 0 <= length <= MAX_ERROR_BYTES:
                    raise WireError(f"shard failed (a message of {length} bytes, refused)")
                raise WireError(f"shard failed: {_recv_exact(self.sock, length).decode(errors='replace')}")
            return _tensor(_recv_exact(self.sock, n * h * dtype.itemsize), dtype, (n, h))  # [n, H]
        except WireError:
            raise
        except OSError as exc:
            raise WireError(f"receive failed: {exc}") from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
