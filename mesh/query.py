"""Mesh-wide queries: ask every live node one question, gather the answers by a deadline.

    query = MeshQuery(bus, node_id, liveness, timeout=1.0)
    query.handle("members", lambda body: {...})   # what this node answers, synchronously
    await query.start()                           # after bus.connect(): the responder
    gathered = await query.ask("members", {"app": "a", "channel": "c"})

``ask`` answers here at once and publishes one request on ``prscd-sys.query.<kind>`` (a
root clients cannot reach, like the heartbeats of mesh/liveness.py) with a reply subject
``<inbox>.<n>``: each node subscribes one inbox (``<inbox>.*``) at start, as nats-py's
own request multiplexer does, so an ask costs one publish, not a subscription. It returns
once every node the liveness table holds alive has answered, or at the deadline: the
others are ``missing``. With no other live node (the embedded bus) nothing is published.

Wire format (msgpack): a request is ``{v, kind, body, from}``; a reply is two values, the
answering node's id and then ``{answer}`` or ``{error}``, so a reply over the size limit
is refused after reading only the id (its node is not waited for, and is missing).

Bounds: answers over ``max_reply_bytes`` are refused by both ends (the answering node
replies with an error instead), requests over ``MAX_REQUEST_BYTES`` are ignored, at most
``max_pending`` asks wait at once (more raise :class:`QueryBusy`) and at most
``max_answering`` answers for other nodes are being made at once (more get a "busy"
error). Handlers run in a task of their own, never in the bus callback. An unknown kind or
a failing handler is answered with an error, not silence. Every drop is counted
(``on_drop``, the node's ``count_drop``) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.bus import Bus, BusMessage, Subscription
from mesh.liveness import ROOT, Liveness

log = logging.getLogger("prscd.mesh.query")

QUERY_ROOT = f"{ROOT}.query"
ALL_QUERIES = f"{QUERY_ROOT}.*"
#: Replies bigger than this are refused: under NATS's default max_payload (1 MB).
MAX_REPLY_BYTES = 512 * 1024
#: Requests are small (a kind and a few names); anything bigger is not ours.
MAX_REQUEST_BYTES = 16 * 1024
MAX_PENDING = 256
MAX_ANSWERING = 64
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: A node id is a MESH_ID and 8 hex digits: its msgpack fits well within this.
_ID_BYTES = 256

Answer = Callable[[dict[str, Any]], dict[str, Any]]


class QueryBusy(RuntimeError):
    """Too many asks wait already on this node."""


@dataclass(frozen=True)
class Gathered:
    """What an ask gathered. An answer with an ``"error"`` key is a refusal (unknown kind,
    a failing handler, too big, too busy): the node answered, but not the question."""

    answers: dict[str, dict[str, Any]]  # node_id -> that node's answer (this node's included)
    answered: list[str]  # node ids that answered, this node first
    missing: list[str]  # live nodes (per Liveness) that did not answer in time


@dataclass(eq=False)
class _Pending:
    expected: set[str]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        if self.expected <= self.answers.keys() | self.refused:
            self.done.set()


class MeshQuery:
    def __init__(self, bus: Bus, node_id: str, liveness: Liveness, timeout: float, *,
                 on_drop: Callable[[str], None] | None = None,
                 max_reply_bytes: int = MAX_REPLY_BYTES, max_pending: int = MAX_PENDING,
                 max_answering: int = MAX_ANSWERING) -> None:
        self.bus, self.node_id, self.liveness, self.timeout = bus, node_id, liveness, timeout
        self.on_drop = on_drop
        self.max_reply_bytes, self.max_pending = max_reply_bytes, max_pending
        self.max_answering = max_answering
        self.dropped: Counter[str] = Counter()
        self.asked = 0
        self.answered_for_others = 0
        self._handlers: dict[str, Answer] = {}
        self._pending: dict[str, _Pending] = {}
        self._tokens = itertools.count(1)
        self._inbox = ""
        self._subs: list[Subscription] = []
        self._answering: set[asyncio.Task[None]] = set()

    def handle(self, kind: str, answer: Answer) -> None:
        """Answer ``kind`` with ``answer(body)`` (here and for other nodes); it must not
        block: it runs on the event loop, in a task of its own."""
        if not _KIND.fullmatch(kind):
            raise ValueError(f"query kind {kind!r}: lower-case letters, digits, '_'")
        self._handlers[kind] = answer

    async def start(self) -> None:
        self._inbox = self.bus.new_inbox()
        self._subs.append(await self.bus.subscribe(f"{self._inbox}.*", self._on_reply))
        self._subs.append(await self.bus.subscribe(ALL_QUERIES, self._on_request))

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # closed or reconnecting: the server forgets it anyway
                log.debug("unsubscribe failed: %s", exc)
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        for pending in self._pending.values():
            pending.done.set()  # asks still waiting return what they have

    # -- asking ----------------------------------------------------------------------

    async def ask(self, kind: str, body: dict[str, Any]) -> Gathered:
        """This node's answer at once, the other live nodes' by the deadline."""
        started = time.monotonic()
        self.asked += 1
        expected = set(self.liveness.nodes) - {self.node_id}
        if not expected:
            return Gathered({self.node_id: self._answer_here(kind, body)}, [self.node_id], [])
        if len(self._pending) >= self.max_pending:
            self._drop("query_busy")
            raise QueryBusy(f"{len(self._pending)} mesh queries wait already")
        token = str(next(self._tokens))
        pending = self._pending[token] = _Pending(expected)
        try:
            sent = await self._request(kind, body, token)
            local = self._answer_here(kind, body)  # while the others work on theirs
            if sent and self._subs:
                remaining = self.timeout - (time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pending.done.wait(), max(remaining, 0.0))
        finally:
            del self._pending[token]
        answers = {self.node_id: local, **pending.answers}
        missing = sorted(expected - pending.answers.keys())
        if missing:
            log.info("query kind=%s missing=%s after %.3fs", kind, ",".join(missing),
                     time.monotonic() - started)
        return Gathered(answers, list(answers), missing)

    async def _request(self, kind: str, body: dict[str, Any], token: str) -> bool:
        if not self.bus.up:
            self._drop("query_bus_down")
            return False
        data = msgpack.packb({"v": 1, "kind": kind, "body": body, "from": self.node_id},
                             use_bin_type=True)
        try:
            await self.bus.publish(f"{QUERY_ROOT}.{kind}", data,
                                   reply=f"{self._inbox}.{token}")
        except Exception as exc:
            self._drop("query_publish_failed")
            log.warning("query not sent kind=%s error=%s", kind, exc)
            return False
        return True

    async def _on_reply(self, message: BusMessage) -> None:
        pending = self._pending.get(message.subject.rpartition(".")[2])
        if pending is None:
            self._drop("query_reply_late")  # after its deadline, or not ours
            return
        data = message.data
        head = msgpack.Unpacker(raw=False)
        head.feed(data[:_ID_BYTES])
        try:
            node = head.unpack()
            offset = head.tell()
        except Exception:
            node, offset = None, 0
        if not isinstance(node, str):
            self._drop("query_reply_malformed")
            log.warning("query reply malformed subject=%s bytes=%d", message.subject, len(data))
            return
        if len(data) > self.max_reply_bytes:
            self._drop("query_reply_too_big")
            log.warning("query reply refused node=%s bytes=%d limit=%d", node, len(data),
                        self.max_reply_bytes)
            pending.refused.add(node)
            pending.check()
            return
        try:
            reply = msgpack.unpackb(memoryview(data)[offset:], raw=False, strict_map_key=False)
            answer = reply["answer"] if "answer" in reply else {"error": str(reply["error"])}
            if not isinstance(answer, dict):
                raise TypeError("answer is not a map")
        except Exception as exc:
            self._drop("query_reply_malformed")
            log.warning("query reply malformed node=%s error=%s", node, type(exc).__name__)
            pending.refused.add(node)
            pending.check()
            return
        pending.answers.setdefault(node, answer)
        pending.check()

    # -- answering -------------------------------------------------------------------

    def _answer_here(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        handler = self._handlers.get(kind)
        if handler is None:
            return {"error": f"unknown query kind {kind[:40]!r}"}
        try:
            answer = handler(body)
        except Exception as exc:
            log.warning("query handler failed kind=%s error=%s: %s", kind,
                        type(exc).__name__, str(exc)[:200])
            return {"error": f"{kind} failed: {type(exc).__name__}"}
        if not isinstance(answer, dict):
            return {"error": f"{kind} answered {type(answer).__name__}, not a map"}
        return answer

    async def _on_request(self, message: BusMessage) -> None:
        if len(message.data) > MAX_REQUEST_BYTES:
            self._drop("query_request_too_big")
            return
        try:
            request = msgpack.unpackb(message.data, raw=False, strict_map_key=False)
            kind, body, sender = str(request["kind"]), request["body"], str(request["from"])
            if not isinstance(body, dict):
                raise TypeError("body is not a map")
        except Exception as exc:
            self._drop("query_request_malformed")
            log.warning("query request malformed subject=%s error=%s", message.subject,
                        type(exc).__name__)
            return
        if sender == self.node_id:
            return  # our own ask: answered locally already
        if not message.reply:
            self._drop("query_request_malformed")
            return
        if len(self._answering) >= self.max_answering:
            self._drop("query_busy")
            await self._reply(message.reply, {"error": "busy: too many queries at once"})
            return
        task = asyncio.get_running_loop().create_task(self._answer(kind, body, message.reply))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, kind: str, body: dict[str, Any], reply: str) -> None:
        answer = self._answer_here(kind, body)
        self.answered_for_others += 1
        await self._reply(reply, {"error": answer["error"]} if "error" in answer
                          else {"answer": answer})

    async def _reply(self, reply: str, payload: dict[str, Any]) -> None:
        head = msgpack.packb(self.node_id, use_bin_type=True)
        data = head + msgpack.packb(payload, use_bin_type=True)
        if len(data) > self.max_reply_bytes:
            self._drop("query_answer_too_big")
            log.warning("query answer too big bytes=%d limit=%d", len(data),
                        self.max_reply_bytes)
            data = head + msgpack.packb(
                {"error": f"answer of {len(data)} bytes is over the limit of "
                          f"{self.max_reply_bytes}"}, use_bin_type=True)
        try:
            await self.bus.publish(reply, data)
        except Exception as exc:
            self._drop("query_reply_failed")
            log.warning("query reply not sent error=%s", exc)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self.on_drop is not None:
            self.on_drop(reason)
