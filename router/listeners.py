"""The router's listening ports, claimed first: before the model, Ray or any worker loads. A port that cannot be
had is one line that names it and the key and flag that change it (a ConfigError: exit code 2), instead of a
traceback after minutes of loading.
"""
from __future__ import annotations

import errno
import socket

from pdserve.config import ConfigError

# config key -> the `pdserve serve` flag that sets it, and whether the port may be turned off
PORTS = {"port": ("--port", False), "http_port": ("--http-port", True), "metrics_port": ("--metrics-port", True)}


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_socket(host: str, port: int, key: str) -> socket.socket:
    """A TCP socket bound to host:port and listening (an HTTP server accepts on it later)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        # listening now, not when uvicorn starts: a socket only bound with SO_REUSEADDR does not keep another
        # process's socket with SO_REUSEADDR (an ephemeral port of some Ray process, say) from binding the same port
        # and listening first, and uvicorn's listen then failed with EADDRINUSE and a traceback
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise ConfigError(_unavailable(key, host, port, e)) from None
    return sock


def grpc_port(server, host: str, port: int, credentials=None) -> int:
    """Adds host:port to a grpc.aio server (which binds it now); returns the bound port."""
    addr = address(host, port)
    if port:  # tried with a plain socket first: gRPC would log its own failure beside ours, and say less
        tcp_socket(host, port, "port").close()
    try:
        bound = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
    except RuntimeError:  # grpcio >= 1.50 raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise ConfigError(_unavailable("port", host, port, "gRPC could not bind it"))
    return bound


def _unavailable(key: str, host: str, port: int, why) -> str:
    flag, optional = PORTS[key]
    reason = why.strerror.lower() if isinstance(why, OSError) and why.strerror else str(why)
    if isinstance(why, OSError) and why.errno == errno.EADDRINUSE:
        reason = "already in use (another pdserve serve?)"
    return (f"router.{key}: cannot listen on {address(host, port)}: {reason}; choose another port with {flag} or "
            f"router.{key} in the config" + (" (-1 / null: off)" if optional else ""))
