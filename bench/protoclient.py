"""A raw WebSocket peer that behaves like ``@yomo/presence`` 2.2.18 on one channel.

What the real client does with each frame (see docs/client.md), without Node or a browser,
so thousands fit in one process: on the join ack it sends ``peer_online`` and
``peer_state``; on a ``peer_online`` it resets that member to ``{id}`` and answers with
its state; ``peer_state`` sets a member, ``peer_offline`` removes it; ``data`` goes to
``on_data``. One connection joins one channel (the real client's Channel objects all
read every frame: with one channel there is nothing to get wrong).

Used by ``bench/soak.py`` and the limit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_SSL = insecure()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class ProtoClient:
    """One connection, one channel; ``members`` is what the real client would list."""

    def __init__(self, base: str, cid: str, *, key: str = "key",
                 on_data: Callable[[ProtoClient, str, dict[str, Any]], None] | None = None,
                 state: dict[str, Any] | None = None) -> None:
        self.base = base  # wss://host:port
        self.cid = cid
        self.key = key
        self.on_data = on_data
        self.state: dict[str, Any] = {"id": cid, **(state or {})}
        self.ws: ClientConnection | None = None
        self.channel: str | None = None
        self.joined = asyncio.Event()
        self.members: dict[str, dict[str, Any] | None] = {}
        self.closed: tuple[int | None, str] | None = None
        self.sent = 0
        self.received = 0
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"{self.base}/v1?publickey={quote(self.key)}&id={quote(self.cid)}"

    async def connect(self, timeout: float = 20.0) -> None:
        self.ws = await connect(self.url, ssl=_SSL if self.base.startswith("wss") else None,
                                open_timeout=timeout, ping_interval=None, max_queue=None,
                                compression=None)
        self.closed = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def join(self, channel: str, timeout: float = 20.0) -> None:
        self.channel = channel
        self.members = {}
        self.joined.clear()
        await self._send({"t": "control", "op": "channel_join", "c": channel,
                          "pl": pack(self.state)})
        await asyncio.wait_for(self.joined.wait(), timeout)

    async def broadcast(self, event: str, data: str) -> None:
        assert self.channel is not None
        await self._send({"t": "data", "c": self.channel,
                          "pl": pack({"event": event, "data": data})})

    async def set_state(self, **state: Any) -> None:
        """Send a new state (the protocol allows it; the real client re-joins instead)."""
        assert self.channel is not None
        self.state.update(state)
        await self._send({"t": "control", "op": "peer_state", "c": self.channel,
                          "pl": pack(self.state)})

    async def leave(self) -> None:
        """What ``channel.leave()`` sends: peer_offline; the connection stays open."""
        assert self.channel is not None
        channel, self.channel = self.channel, None
        self.joined.clear()
        self.members = {}
        await self._send({"t": "control", "op": "peer_offline", "c": channel})

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self.joined.clear()
        self.channel = None

    def abort(self) -> None:
        """Vanish: the TCP connection is cut without a close frame."""
        if self.ws is not None:
            self.ws.transport.abort()

    async def _send(self, obj: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(pack(obj))
        self.sent += 1

    async def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    self.received += 1
                    await self._on_frame(msgpack.unpackb(raw))
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.closed = (rcvd.code, rcvd.reason) if rcvd else (None, "")
            self.joined.clear()

    async def _on_frame(self, msg: dict[str, Any]) -> None:
        op, p = msg.get("op"), msg.get("p")
        if msg.get("t") == "data":
            if self.on_data is not None and msg.get("c") == self.channel:
                self.on_data(self, p or "", msgpack.unpackb(msg["pl"]))
            return
        channel = self.channel
        if channel is None:
            return
        if op == "channel_join":
            await self._send({"t": "control", "op": "peer_online", "c": channel})
            await self._send({"t": "control", "op": "peer_state", "c": channel,
                              "pl": pack(self.state)})
            self.joined.set()
        elif p == self.cid or p is None:
            return
        elif op == "peer_online":
            self.members[p] = None
            await self._send({"t": "control", "op": "peer_state", "c": channel,
                              "pl": pack(self.state)})
        elif op == "peer_state":
            self.members[p] = msgpack.unpackb(msg["pl"])
        elif op == "peer_offline":
            self.members.pop(p, None)
