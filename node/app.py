"""The composition root: builds a node and its listeners, starts and stops them in order.

Nothing else wires parts together. The Node gets its bus, tracing and auth from here;
each listener gets the node only as the narrow interfaces of :mod:`node.ports`, plus
the settings. Start: bus, then the node answers mesh queries (mesh/query.py) and joins
the mesh, then the listeners (and the server API, node/api.py) accept peers. Stop: refuse
new peers, close the listeners (peers get 1001), the peers left go offline, leave the
mesh, stop answering queries, close the bus, flush the spans, close the auth client.
"""

from __future__ import annotations

import errno
import logging
from ssl import SSLContext
from typing import Any, Protocol

from mesh.bridge import new_node_id
from mesh.bus import Bus, EmbeddedBus
from mesh.query import MeshQuery
from mesh.tracing import make_tracing
from node.admin import AdminView
from node.api import ApiListener
from node.auth import Auth
from node.config import Settings
from node.memory import HeapTrim
from node.metrics import MetricsListener
from node.server import Node
from node.tls import CertificateWatcher, CertInfo, server_context
from node.transports.websocket import WebSocketListener
from node.transports.webtransport import WebTransportListener
from node.webhooks import Webhooks

log = logging.getLogger("prscd.app")
#: PORT=0 with WebTransport: ports tried for one free on both TCP and UDP.
PORT_TRIES = 8


class Listener(Protocol):
    async def close(self) -> None: ...


def make_bus(settings: Settings) -> Bus:
    if settings.nats_url:
        from mesh.nats import NatsBus  # imported only when the mesh is configured

        return NatsBus(settings)
    return EmbeddedBus()


class App:
    """One node process: ``await App(settings, cert).start()``, later ``await app.stop()``."""

    def __init__(self, settings: Settings, cert: CertInfo | None = None, *,
                 bus: Bus | None = None, span_exporter: Any = None) -> None:
        self.settings = settings
        node_id = new_node_id(settings.mesh_id)
        self.node = Node(settings, node_id=node_id, bus=bus or make_bus(settings),
                         tracing=make_tracing(settings, node_id, span_exporter),
                         auth=Auth.from_settings(settings), cert=cert)
        # Every node answers the server API's mesh-wide questions, API_KEYS set or not.
        self.query = MeshQuery(self.node.bus, node_id, self.node.liveness,
                               settings.api_query_timeout, on_drop=self.node.count_drop)
        self.node.answer_queries(self.query)
        # The operations page (node/admin.py): on the API when it is on, else on PORT for
        # loopback clients (ADMIN_LOCAL); node/endpoints.py and node/api.py serve it.
        self.node.admin = AdminView(self.node, self.query, on_node_port=(
            not settings.api_keys and settings.admin_local))
        if settings.webhook_url:  # channel events ask the mesh too (node/occupancy.py)
            self.node.webhooks = Webhooks(settings, node_id=node_id,
                                          presence=self.node.presence,
                                          count_drop=self.node.count_drop, query=self.query)
        self.api_port: int | None = None
        self.metrics_port: int | None = None
        self.listeners: list[Listener] = []
        self.addresses: list[tuple[str, int]] = []
        self.port = settings.port
        #: Follows the certificate files (node/tls.py): renewed pairs without a restart.
        self.certificates: CertificateWatcher | None = None
        #: Free heap pages back to the system now and then (node/memory.py).
        self.heap_trim = HeapTrim(settings.malloc_trim_interval)
        self._stopped = False

    async def start(self) -> None:
        settings, node = self.settings, self.node
        await node.bus.connect()
        await self.query.start()
        await node.start()
        if node.webhooks is not None:
            node.webhooks.start()
        cert = node.cert
        ssl = server_context(cert) if (settings.tls and cert) else None
        wants_wt = settings.webtransport and ssl is not None and cert is not None
        for attempt in range(PORT_TRIES):
            ws = WebSocketListener(settings, node, node)
            self.addresses = await ws.start(ssl)
            self.port = self.addresses[0][1]
            if not wants_wt:
                break
            assert cert is not None
            # HTTP/3 needs TLS; it shares the port number (UDP) with the WebSocket server.
            wt = WebTransportListener(settings, node, node)
            try:
                self.addresses += await wt.start(self.port, cert)
            except OSError as exc:
                # PORT=0: the kernel's free TCP port can be a busy UDP one; take another.
                await ws.close()
                if settings.port or exc.errno != errno.EADDRINUSE or attempt == PORT_TRIES - 1:
                    raise
                log.info("udp port %d is taken: trying another port (PORT=0)", self.port)
                continue
            self.listeners.append(wt)
            break
        self.listeners.insert(0, ws)
        if settings.api_keys:
            api = ApiListener(settings, node, self.query, admin=node.admin)
            self.api_port = (await api.start(ssl))[0][1]
            self.listeners.append(api)
            node.metrics.api_answered = api.answered  # read at scrape time
        if settings.metrics_port:
            metrics = MetricsListener(node.metrics, settings.host, settings.metrics_port)
            self.metrics_port = (await metrics.start())[0][1]
            self.listeners.append(metrics)
        if ssl is not None and cert is not None:
            self.certificates = self._watch_certificate(cert, ssl)
        self.heap_trim.start()
        log.info("node ready node_id=%s mesh_id=%s port=%d tls=%s bus=%s", node.node_id,
                 settings.mesh_id, self.port, ssl is not None, node.bus.kind)

    def _watch_certificate(self, cert: CertInfo, ssl: SSLContext) -> CertificateWatcher:
        """New TCP connections (WebSocket, the API) take the pair from the shared context,
        new QUIC connections from the listener's configuration, /cert-hash from node.cert."""
        on_change = [lambda info: ssl.load_cert_chain(info.cert_file, info.key_file)]
        for listener in self.listeners:
            if isinstance(listener, WebTransportListener):
                on_change.append(listener.use_certificate)
                on_change.append(listener.log_browser_hints)  # the SPKI flag changed
        on_change.append(lambda info: setattr(self.node, "cert", info))
        watcher = CertificateWatcher(cert, on_change, cache_dir=self.settings.cert_cache_dir,
                                     domain=self.settings.domain)
        watcher.start()
        return watcher

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        node = self.node
        await self.heap_trim.stop()
        if self.certificates is not None:
            await self.certificates.stop()
        node.draining = True
        for listener in self.listeners:
            await listener.close()
        await node.stop()
        if node.webhooks is not None:  # the peers' member_left events are queued by now
            await node.webhooks.aclose()
        await self.query.stop()
        await node.bus.close()
        await node.tracing.aclose()
        await node.auth.aclose()
        log.info("node stopped node_id=%s", node.node_id)
