"""Sockets around a node under test: a TLS context for its self-signed certificate, free ports."""

from __future__ import annotations

import random
import socket
import ssl


def insecure() -> ssl.SSLContext:
    """TLS without verification: nodes under test use a self-signed certificate.

    No CA store is loaded (``create_default_context`` parses the system's, ~45 ms here):
    nothing is verified, and a bench opening connections one context each measured
    mostly that."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _below_ephemeral() -> int:
    """The first port the kernel hands out to outgoing connections (32768 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(count: int, tries: int = 200) -> int:
    """A first port such that ``count`` consecutive ports are free (TCP and UDP).

    Taken below the ephemeral range: a block in it can be taken by any outgoing connection
    (a client, a NATS gateway) between this check and the bind, as seen once in CI."""
    top = max(_below_ephemeral(), 20000 + 2 * count) - count
    for _ in range(tries):
        base = random.randint(20000, top)
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


def free_port() -> int:
    """A port free right now on 127.0.0.1, TCP and UDP (nodes with WebTransport use both),
    from below the ephemeral range for the reason free_port_block gives."""
    return free_port_block(1)
