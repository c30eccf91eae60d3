"""Inspection: SIGUSR1 dumps state, SIGUSR2 logs runtime stats, and the pid file.

Dumps go to the log as one JSON line each so they can be grepped at 3 a.m.; they
hold client ids and channel names, never keys or credentials.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from asyncio import AbstractEventLoop
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.server import Node

log = logging.getLogger("prscd.inspect")


def dump_state(node: Node) -> None:
    state = {"node_id": node.node_id, "mesh_id": node.settings.mesh_id,
             "realms": node.presence.snapshot()}
    log.info("state dump %s", json.dumps(state, separators=(",", ":")))


def dump_stats(node: Node) -> None:
    log.info("runtime stats %s", json.dumps(node.stats(), separators=(",", ":")))


def install_signal_handlers(loop: AbstractEventLoop, node: Node) -> None:
    loop.add_signal_handler(signal.SIGUSR1, dump_state, node)
    loop.add_signal_handler(signal.SIGUSR2, dump_stats, node)


def write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def remove_pid_file(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass
