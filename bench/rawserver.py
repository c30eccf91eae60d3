"""The raw baseline: a minimal ``websockets`` server doing what the library does best.

Each connection's first message is taken as its join and answered with a fixed
ack; every later message is passed to ``websockets.broadcast`` for all other
connections (one channel, no decoding). Same library settings as prscd where
they matter (compression off), library defaults otherwise (its own keepalive).
This is the library's ceiling for fan-out and its floor for memory per connection.

Usage: python -m bench.rawserver --port N [--tls-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import msgpack
from websockets.asyncio.server import ServerConnection, broadcast, serve

ACK = msgpack.packb({"t": "control", "op": "channel_join", "c": "bench", "mesh": "raw"})


async def main(port: int, tls_dir: str | None) -> None:
    ssl = None
    if tls_dir:
        from node.tls import ensure_certificate, server_context

        ssl = server_context(ensure_certificate("", "", Path(tls_dir)))
    members: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        try:
            await ws.recv()
            await ws.send(ACK)
            members.add(ws)
            async for message in ws:
                broadcast([m for m in members if m is not ws], message)
        finally:
            members.discard(ws)

    async with serve(handler, "127.0.0.1", port, ssl=ssl, compression=None,
                     max_size=64 * 1024) as server:
        print(f"raw websockets server on {port} tls={ssl is not None}", flush=True)
        await server.serve_forever()


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-dir")
    parser.add_argument("--mode", default="broadcast", help="(kept for logs)")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.port, args.tls_dir))
    else:
        uvloop.run(main(args.port, args.tls_dir))


if __name__ == "__main__":
    run()
