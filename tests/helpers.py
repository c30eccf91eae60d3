"""Small helpers for socket-level tests: raw WebSocket peers speaking msgpack."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningNode


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def join_frame(channel: str, client_id: str, **state: Any) -> bytes:
    return pack({"t": "control", "op": "channel_join", "c": channel,
                 "pl": pack({"id": client_id, **state})})


def data_frame(channel: str, event: str, data: str) -> bytes:
    return pack({"t": "data", "c": channel, "pl": pack({"event": event, "data": data})})


def control(op: str, channel: str, pl: bytes | None = None) -> bytes:
    body: dict[str, Any] = {"t": "control", "op": op, "c": channel}
    if pl is not None:
        body["pl"] = pl
    return pack(body)


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


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
