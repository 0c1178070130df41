"""The serve command's port check: a live listener refuses the start, a port whose last
connections sit in TIME_WAIT (a server stopped a moment ago) does not."""

from __future__ import annotations

import socket

import pytest

from deployments.launch import PortInUseError, check_ports_free


def _port_in_time_wait() -> int:
    """A port whose server side closed first (so its end of the connection is in TIME_WAIT) and
    whose listener is gone. (Linux lets a SO_REUSEADDR bind through a TIME_WAIT socket whose own
    socket had the option too, which Serve's HTTP and gRPC servers set.)"""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and grpc set it
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the side that closes first holds TIME_WAIT
    client.recv(1)  # sees the FIN
    client.close()
    listener.close()
    return port


def test_time_wait_does_not_refuse_a_restart():
    port = _port_in_time_wait()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: refused by TIME_WAIT alone
    check_ports_free("127.0.0.1", {"HTTP": port})


@pytest.mark.parametrize("name, bind_host", [("HTTP", "127.0.0.1"), ("gRPC", "")])
def test_a_live_listener_is_refused(name, bind_host):
    with socket.socket() as live:
        live.bind((bind_host, 0))
        live.listen()
        port = live.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"{name} port {port} is already in use"):
            check_ports_free("127.0.0.1", {name: port})
