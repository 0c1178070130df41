"""The `ray` transport's data path: one persistent TCP connection per (router, shard), framed
tensors, no Ray in the loop. Ray actor calls stay for control (start, address, ping, stats,
replacement): a plain actor call costs milliseconds here, a socket round trip tens of
microseconds, and a decode step makes one exchange per MoE layer.

A request frame is a header `<iiiiB` (layer, rows n, hidden size H, top-k K, dtype code) then
the hidden rows `[n, H]` in that dtype, the expert ids `[n, K]` int64 and the weights `[n, K]`
float32; the answer is the shard's weighted partial sums `[n, H]` in the same dtype, preceded by a
status byte (0: ok, 1: the shard failed; then a UTF-8 message of the length that follows).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<iiiiB")
_STATUS = struct.Struct("<Bi")  # status, error message bytes
_DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class WireError(ConnectionError):
    """The connection broke, timed out or carried a frame that does not parse."""


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


# -- the shard's side -------------------------------------------------------------------------

Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExchangeServer:
    """Listens on a free port; a thread per connected router reads requests and answers them with
    `compute(layer, hidden [n, H], ids [n, K], weights [n, K]) -> [n, H]`."""

    def __init__(self, compute: Compute, hidden_size: int, host: str = "0.0.0.0") -> None:
        self.compute = compute
        self.hidden_size = hidden_size
        self._listener = socket.create_server((host, 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="exchange-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="exchange-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self._closed:
                try:
                    layer, n, h, k, code = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
                    dtype = _DTYPES.get(code)
                    if dtype is None or h != self.hidden_size or n < 0 or k <= 0:
                        raise WireError(f"bad frame: n={n} H={h} (expected {self.hidden_size}) K={k} dtype={code}")
                    hidden_bytes = n * h * dtype.itemsize
                    payload = _recv_exact(conn, hidden_bytes + n * k * 12)  # one read for the three arrays
                    hidden = _tensor(payload, dtype, (n, h), 0, hidden_bytes)  # [n, H]
                    ids = _tensor(payload, torch.int64, (n, k), hidden_bytes, n * k * 8)  # [n, K]
                    weights = _tensor(payload, torch.float32, (n, k), hidden_bytes + n * k * 8, n * k * 4)  # [n, K]
                except (OSError, WireError) as exc:
                    if not self._closed and not isinstance(exc, WireError | ConnectionResetError):
                        log.warning("exchange connection dropped: %s", exc)
                    return
                try:
                    out = self.compute(layer, hidden, ids, weights).to(dtype)  # [n, H]
                except Exception as exc:  # noqa: BLE001 - the router hears of it and re-forms
                    message = f"{type(exc).__name__}: {exc}".encode()[:4096]
                    log.exception("shard compute failed for layer %d", layer)
                    conn.sendall(_STATUS.pack(1, len(message)) + message)
                    continue
                try:
                    _send_all(conn, [_STATUS.pack(0, 0), _raw(out)])
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread (close alone does not)
        except OSError:
            pass
        self._listener.close()


# -- the router's side ------------------------------------------------------------------------

class ExchangeClient:
    """One router's connection to one shard. `send` then `receive`: a router sends to every shard
    first and then collects, so the shards compute in parallel."""

    def __init__(self, address: tuple[str, int], timeout_s: float) -> None:
        try:
            self.sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            raise WireError(f"cannot connect to shard at {address[0]}:{address[1]}: {exc}") from exc
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
                raise WireError(f"shard failed: {_recv_exact(self.sock, length).decode(errors='replace')}")
            return _tensor(_recv_exact(self.sock, n * h * dtype.itemsize), dtype, (n, h))  # [n, H]
        except OSError as exc:
            raise WireError(f"receive failed: {exc}") from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
