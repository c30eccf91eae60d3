"""The keepalive against a stalled event loop on real sockets (uvloop, threads): not a pure
test, so apart from tests/test_keepalive.py's (its fakes are shared)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from node.transports.ws_keepalive import Keepalive
from tests.mesh_helpers import wait_until
from tests.test_keepalive import FakePeers, link


def test_a_stalled_loop_makes_no_live_peer_silent_on_uvloop() -> None:
    """The node's loop blocked for 0.6 s in a socket callback right after pinging (soft
    timeout 0.2 s); the pongs reach the socket 0.1 s after each ping, during the stall. uvloop then runs the due
    keepalive timer before it reads that socket: neither the stall nor the unread pong may
    count against the peers."""
    import socket
    import threading

    import uvloop

    async def main() -> tuple[list[tuple[str, str]], int]:
        loop = asyncio.get_running_loop()
        peers: Any = FakePeers()
        keepalive = Keepalive(peers, interval=0.3, timeout=5.0, silent_after=0.2)
        ours, theirs = socket.socketpair()  # the peers' pongs
        busy, poke = socket.socketpair()  # a frame whose handling blocks the loop
        for sock in (ours, busy):
            sock.setblocking(False)
        links = [link(f"p{i}", answers=False) for i in range(20)]
        answers: list[threading.Timer] = []

        def answer(data: bytes) -> None:  # the client answers 0.1 s after each ping
            answers.append(threading.Timer(0.1, theirs.send, [b"pong"]))
            answers[-1].start()

        for _, ws in links:
            ws.protocol.send_ping = answer
        stalls = 0

        def read_pongs() -> None:  # what the library does when the pongs' bytes are read
            ours.recv(65536)
            for _, ws in links:
                for pong, _ in ws.pending_pings.values():
                    pong.set_result(0.001)
                ws.pending_pings.clear()

        def stall() -> None:
            nonlocal stalls
            busy.recv(100)
            time.sleep(0.6)  # the pongs arrive meanwhile
            stalls += 1

        loop.add_reader(ours.fileno(), read_pongs)
        loop.add_reader(busy.fileno(), stall)
        for one, _ in links:
            keepalive.add(one)
        try:
            for round_ in range(3):
                await wait_until(lambda: all(ws.pending_pings for _, ws in links), 5, "pings")
                poke.send(b"x")
                await wait_until(lambda r=round_: stalls > r, 5, "the stall")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        finally:
            keepalive.stop()
            for timer in answers:
                timer.cancel()
                timer.join()
            for sock in (ours, busy):
                loop.remove_reader(sock.fileno())
            for sock in (ours, theirs, busy, poke):
                sock.close()
        return peers.reports + [("fault", f[0]) for f in peers.faults], stalls

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        reports, stalls = runner.run(main())
    assert stalls == 3 and reports == []
