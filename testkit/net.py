"""Sockets around a node under test: a TLS context for its self-signed certificate, free ports."""

from __future__ import annotations

import random
import socket
import ssl


def insecure() -> ssl.SSLContext:
    """TLS without verification: nodes under test use a self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (and UDP, for nodes with WebTransport)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def free_port_block(count: int, tries: int = 200) -> int:
    """A first port such that ``count`` consecutive ports are free (TCP and UDP)."""
    for _ in range(tries):
        base = random.randint(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                tcp = socket.socket()
                socks.append(tcp)
                tcp.bind(("127.0.0.1", port))
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(udp)
                udp.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")
