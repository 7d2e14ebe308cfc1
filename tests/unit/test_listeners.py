"""The router's claimed ports stay its own from the claim on (router/listeners.py)."""
from __future__ import annotations

import errno
import socket

import pytest

from pdserve.config import ConfigError
from pdserve.router.listeners import tcp_socket


def test_a_claimed_port_cannot_be_taken_before_its_server_starts():
    # CI, 2026-12-06: the HTTP port was bound (SO_REUSEADDR) at start-up but listened on only when uvicorn started;
    # in between another socket with SO_REUSEADDR bound it (two unlistened ones may share a port) and listened
    # first, and uvicorn's listen failed with EADDRINUSE and a traceback. Claimed sockets now listen at once.
    claimed = tcp_socket("127.0.0.1", 0, "http_port")
    try:
        port = claimed.getsockname()[1]
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as e:
                other.bind(("127.0.0.1", port))
            assert e.value.errno == errno.EADDRINUSE
        # and the claimed socket takes connections (queued until the HTTP server accepts them)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        claimed.close()


def test_a_port_someone_listens_on_is_one_clear_error():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"router.metrics_port: cannot listen on 127.0.0.1:{port}: already in use"):
            tcp_socket("127.0.0.1", port, "metrics_port")
