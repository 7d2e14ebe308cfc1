"""What a server process started, seen from outside: its process tree and the sockets that tree listens on."""
from __future__ import annotations

import ipaddress
import socket
import time

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants alive now."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(procs: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, name, address, port) of every TCP socket in LISTEN and every UDP socket not connected to a peer."""
    out = []
    for p in procs:
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            tcp_listen = c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN
            udp_bound = c.type == socket.SOCK_DGRAM and not c.raddr
            if tcp_listen or udp_bound:
                out.append((p.pid, name, c.laddr.ip, c.laddr.port))
    return out


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket bound to loopback
    return (mapped or addr).is_loopback


def left_running(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Those of `procs` still running (zombies aside) after up to `timeout` s: children are reaped by their
    parents a moment after the router exits."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
