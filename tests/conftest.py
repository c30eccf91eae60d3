"""Shared fixtures: real nodes on ephemeral ports, real TLS, real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node.app import App
from node.config import Settings
from node.server import Node
from node.tls import CertInfo, ensure_certificate


@dataclass
class RunningNode:
    app: App

    @property
    def node(self) -> Node:
        return self.app.node

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def url(self) -> str:
        """What @yomo/presence is given (it appends ?publickey=..&id=..)."""
        return f"https://127.0.0.1:{self.port}/v1"

    @property
    def ws_base(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def ws_url(self, publickey: str = "key", client_id: str = "alice", **extra: str) -> str:
        from urllib.parse import quote

        query = f"publickey={quote(publickey)}&id={quote(client_id)}"
        for k, v in extra.items():
            query += f"&{k}={quote(v)}"
        return f"{self.ws_base}/v1?{query}"


@pytest.fixture(scope="session")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> CertInfo:
    """One generated dev certificate for the whole run (as a laptop would have)."""
    return ensure_certificate("", "", Path(tmp_path_factory.mktemp("certs")))


NodeFactory = Callable[..., Awaitable[RunningNode]]


@pytest.fixture
async def node_factory(dev_cert: CertInfo, tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start in-process nodes: ``await node_factory(MESH_ID="eu", PUBLIC_KEYS="k:app")``.

    Keys are environment names, parsed by the real Settings.from_env.
    """
    started: list[App] = []

    async def start(span_exporter: Any = None, **env: Any) -> RunningNode:
        base = {"PORT": "0", "HOST": "127.0.0.1", "PING_INTERVAL": "10",
                "PID_FILE": str(tmp_path / "prscd.pid"), "CERT_CACHE_DIR": str(tmp_path)}
        base.update({k: str(v) for k, v in env.items()})
        settings = Settings.from_env(base)
        app = App(settings, dev_cert if settings.tls else None, span_exporter=span_exporter)
        await app.start()
        started.append(app)
        return RunningNode(app)

    yield start
    for app in reversed(started):
        await app.stop()


@pytest.fixture
async def node(node_factory: NodeFactory) -> RunningNode:
    return await node_factory()
