"""Drive the real @yomo/presence client (one Node process per client) from asyncio tests.

    async with puppets() as make:
        alice, bob = await make("alice"), await make("bob")
        await alice.connect(url, "key", "alice")
        await alice.join("room", {"name": "Alice"})
        ...
        await bob.wait_peers("room", {"alice"})

Every puppet event is a dict with an "ev" key (see puppet.mjs) plus "_t", the
time.monotonic() at which Python read it.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import os
import shutil
import signal
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

E2E_DIR = Path(__file__).resolve().parent
SCRIPT = E2E_DIR / "puppet.mjs"

Event = dict[str, Any]
T = TypeVar("T")

_live: weakref.WeakSet[Puppet] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for p in list(_live):
        p.kill()


class PuppetCommandError(RuntimeError):
    """The puppet answered a command with {"ev": "error"}."""

    def __init__(self, puppet: str, cmd: str, reply: Event) -> None:
        super().__init__(f"{puppet}: {cmd} failed: {reply.get('message')}")
        self.reply = reply


class PuppetRejected(PuppetCommandError):
    """connect(): the server refused the WebSocket handshake with an HTTP status."""

    @property
    def status(self) -> int:
        return int(self.reply["status"])

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.reply.get("headers") or {})


class Puppet:
    """One real @yomo/presence client in its own `node puppet.mjs` process."""

    _names = itertools.count(1)

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[Event] = []
        self.stderr = ""
        self._cond = asyncio.Condition()
        self._eof = False
        self._req = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Event]] = {}
        self._peers: dict[str, list[Event]] = {}
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    async def start(cls, name: str | None = None, *, timeout: float = 15.0) -> Puppet:
        """Spawn `node puppet.mjs` and wait for its "ready" event."""
        if shutil.which("node") is None:
            raise RuntimeError("`node` (Node.js >= 20) is not on PATH; the e2e puppets need it")
        if not (E2E_DIR / "node_modules" / "@yomo" / "presence").is_dir():
            raise RuntimeError(f"{E2E_DIR}/node_modules is missing: run `npm ci` in {E2E_DIR}")
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(SCRIPT),
            cwd=E2E_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        p = cls(proc, name or f"puppet-{next(cls._names)}")
        _live.add(p)
        try:
            await p.wait_event(lambda e: e["ev"] == "ready", timeout, what="puppet start-up")
        except BaseException:
            await p.close()
            raise
        return p

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self._eof

    def kill(self) -> None:
        """SIGKILL: the server sees the TCP connection drop with no close frame."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    async def close(self, timeout: float = 3.0) -> None:
        """Ask the puppet to exit, wait, and SIGKILL it if it lingers. Idempotent."""
        try:
            if self.proc.returncode is None and not self._eof and self.proc.stdin is not None:
                with suppress(Exception):
                    self._send({"cmd": "exit"})
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            self.kill()
            with suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), timeout)
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for fut in self._pending.values():
                fut.cancel()
            _live.discard(self)

    async def __aenter__(self) -> Puppet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- commands -------------------------------------------------------------------

    async def connect(
        self, url: str, publickey: str, id: str, *, debug: bool = False, timeout: float = 10.0,
        rejoin: bool = False,
    ) -> None:
        """createPresence(url, {publicKey, id, autoDowngrade: true}); returns once open.

        Raises PuppetRejected if the handshake got an HTTP error status, PuppetCommandError
        if the socket closed before opening. The client itself keeps retrying either way.
        ``rejoin``: join every channel again on each later `open` (an "rejoined" event each),
        as docs/presence.md tells apps to.
        """
        if self.name.startswith("puppet-"):
            self.name = id
        try:
            await self._request(
                "connect", timeout, url=url, publickey=publickey, id=id, debug=debug,
                rejoin=rejoin,
            )
        except PuppetCommandError as e:
            if "status" in e.reply:
                raise PuppetRejected(self.name, "connect", e.reply) from None
            raise

    async def join(
        self, channel: str, state: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> None:
        """joinChannel(channel, state); returns after the server's join ack."""
        self._peers[channel] = []
        await self._request("join", timeout, channel=channel, state=state)

    async def subscribe(self, channel: str, event: str, timeout: float = 5.0) -> None:
        await self._request("subscribe", timeout, channel=channel, event=event)

    async def broadcast(self, channel: str, event: str, data: Any, timeout: float = 5.0) -> None:
        await self._request("broadcast", timeout, channel=channel, event=event, data=data)

    async def leave(self, channel: str, timeout: float = 5.0) -> None:
        """channel.leave(): sends peer_offline; the socket stays open."""
        await self._request("leave", timeout, channel=channel)
        self._peers[channel] = []

    async def unload(self, timeout: float = 5.0) -> None:
        """Dispatch `beforeunload` (a closing tab): every joined channel sends peer_offline."""
        await self._request("unload", timeout)

    async def disconnect(
        self, code: int = 1000, reason: str = "puppet disconnect", timeout: float = 5.0
    ) -> None:
        """Close the current WebSocket with a close frame (the client has no API for this)."""
        await self._request("disconnect", timeout, code=code, reason=reason)

    # -- observations ---------------------------------------------------------------

    def peers(self, channel: str) -> list[Event]:
        """The latest member list the client reported for channel (the client excludes itself)."""
        return list(self._peers.get(channel, []))

    def peer_ids(self, channel: str) -> set[str]:
        return {str(p.get("id")) for p in self.peers(channel)}

    def data(self, channel: str, event: str) -> list[Event]:
        """Received broadcasts: dicts with "data" (decoded JSON) and "from" (sender id)."""
        return [
            e
            for e in self.events
            if e["ev"] == "data" and e.get("channel") == channel and e.get("event") == event
        ]

    def mark(self) -> int:
        """An index into events, for wait_event(..., since=mark)."""
        return len(self.events)

    async def wait_for(
        self, predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Wait until predicate() is truthy (re-checked on every puppet event); return its value."""
        async with self._cond:
            try:
                async with asyncio.timeout(timeout):
                    while not (result := predicate()):
                        if self._eof:
                            self._fail(f"puppet exited while waiting for {what}")
                        await self._cond.wait()
            except TimeoutError:
                self._fail(f"timed out after {timeout}s waiting for {what}")
            return result

    async def wait_event(
        self,
        pred: Callable[[Event], bool],
        timeout: float = 5.0,
        what: str = "event",
        since: int = 0,
    ) -> Event:
        """Wait for an event (at index >= since) matching pred; return the first one."""

        def find() -> Event | None:
            return next((e for e in self.events[since:] if pred(e)), None)

        return await self.wait_for(find, timeout, what)  # type: ignore[return-value]

    async def wait_peers(self, channel: str, ids: set[str], timeout: float = 5.0) -> list[Event]:
        """Wait until the latest member id set of channel equals ids; return the members."""
        await self.wait_for(
            lambda: self.peer_ids(channel) == ids,
            timeout,
            what=f"peers of {channel!r} == {sorted(ids)} (now {sorted(self.peer_ids(channel))})",
        )
        return self.peers(channel)

    async def wait_data(
        self, channel: str, event: str, count: int = 1, timeout: float = 5.0
    ) -> list[Event]:
        """Wait until at least count broadcasts of event arrived on channel; return them all."""
        await self.wait_for(
            lambda: len(self.data(channel, event)) >= count,
            timeout,
            what=f"{count} x {event!r} on {channel!r}",
        )
        return self.data(channel, event)

    def describe(self, last: int = 25) -> str:
        """The last events and stderr, for failure messages."""
        lines = [json.dumps({k: v for k, v in e.items() if k != "_t"}) for e in self.events[-last:]]
        return (
            f"--- {self.name} (pid {self.proc.pid}, returncode {self.proc.returncode}) "
            f"last {len(lines)} of {len(self.events)} events:\n"
            + "\n".join(lines)
            + f"\n--- {self.name} stderr (tail):\n{self.stderr[-3000:]}"
        )

    # -- internals --------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        raise AssertionError(f"{self.name}: {message}\n{self.describe()}")

    def _send(self, obj: Event) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")

    async def _request(self, cmd: str, timeout: float, **fields: Any) -> Event:
        if not self.alive:
            self._fail(f"cannot send {cmd}: puppet is not running")
        req = next(self._req)
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        try:
            self._send({"cmd": cmd, "req": req, **fields})
            await self.proc.stdin.drain()  # type: ignore[union-attr]
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            self._fail(f"no reply to {cmd} {fields} within {timeout}s")
        except asyncio.CancelledError:
            if self._eof and fut.cancelled():
                self._fail(f"puppet exited before replying to {cmd}")
            raise
        finally:
            self._pending.pop(req, None)
        if reply["ev"] == "error":
            raise PuppetCommandError(self.name, cmd, reply)
        return reply

    def _on_event(self, e: Event) -> None:
        ev = e.get("ev")
        if ev in ("ok", "error") and isinstance(e.get("req"), int):
            fut = self._pending.get(e["req"])
            if fut is not None and not fut.done():
                fut.set_result(e)
        elif ev == "peers":
            self._peers[e["channel"]] = list(e.get("peers") or [])

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    e = json.loads(line)
                except ValueError:
                    e = {"ev": "garbage", "line": line.decode(errors="replace")}
                e["_t"] = time.monotonic()
                self.events.append(e)
                self._on_event(e)
                async with self._cond:
                    self._cond.notify_all()
        finally:
            self._eof = True
            for fut in self._pending.values():
                fut.cancel()
            async with self._cond:
                self._cond.notify_all()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr = (self.stderr + chunk.decode(errors="replace"))[-200_000:]


@asynccontextmanager
async def puppets() -> AsyncIterator[Callable[..., Awaitable[Puppet]]]:
    """Yield a factory `await make(name=None) -> Puppet`; closes every puppet it made.

    As a pytest-asyncio fixture:

        @pytest_asyncio.fixture
        async def make_puppet():
            async with puppets() as make:
                yield make
    """
    made: list[Puppet] = []

    async def make(name: str | None = None) -> Puppet:
        p = await Puppet.start(name)
        made.append(p)
        return p

    try:
        yield make
    finally:
        await asyncio.gather(*(p.close() for p in made), return_exceptions=True)
