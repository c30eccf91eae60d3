"""Small helpers for socket-level tests: raw WebSocket peers speaking msgpack.

Frame builders and the TLS context come from testkit (bench shares them) and are
re-exported: test modules import them from here.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from testkit.frames import control as control
from testkit.frames import data_frame as data_frame
from testkit.frames import join_frame as join_frame
from testkit.frames import pack as pack
from testkit.net import insecure as insecure
from tests.conftest import RunningNode


async def peer(node: RunningNode, client_id: str = "alice", key: str = "key",
               **kw: Any) -> ClientConnection:
    return await connect(node.ws_url(key, client_id), ssl=insecure(), **kw)


async def recv(ws: ClientConnection, timeout: float = 3.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, bytes), f"expected a binary frame, got {raw!r}"
    return msgpack.unpackb(raw)


async def joined(node: RunningNode, channel: str, client_id: str, key: str = "key",
                 **kw: Any) -> ClientConnection:
    """Connect and join; returns after the ack."""
    ws = await peer(node, client_id, key, **kw)
    await ws.send(join_frame(channel, client_id))
    ack = await recv(ws)
    assert ack["op"] == "channel_join" and ack["c"] == channel, ack
    return ws


async def barrier(sender: ClientConnection, receiver: ClientConnection, channel: str) -> None:
    """Prove ``receiver`` got nothing else first: ``sender``'s marker must be its next frame.

    Per-connection order is guaranteed, so this replaces "wait and see nothing".
    """
    await sender.send(data_frame(channel, "marker", '"m"'))
    got = await recv(receiver)
    assert got["t"] == "data" and msgpack.unpackb(got["pl"])["event"] == "marker", got


async def still_served(node: RunningNode, channel: str = "canary") -> None:
    """Another pair of peers can still join and talk: the node was not hurt."""
    a = await joined(node, channel, "canary-a")
    b = await joined(node, channel, "canary-b")
    await a.send(data_frame(channel, "ping", '"ok"'))
    got = await recv(b)
    assert got["p"] == "canary-a" and got["t"] == "data"
    await a.close()
    await b.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """A plain GET (the node's TLS certificate not verified); HTTP errors are answers too."""
    ctx = insecure() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """http_get off the event loop (the node under test runs on it)."""
    return await asyncio.to_thread(http_get, url)
