"""Inspection: SIGUSR1 dumps state, SIGUSR2 logs runtime stats, SIGHUP reloads the keys
file, and the pid file.

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

from node.config import ConfigError

if TYPE_CHECKING:
    from node.server import Node

log = logging.getLogger("prscd.introspect")


def dump_state(node: Node) -> None:
    state = {"node_id": node.node_id, "mesh_id": node.settings.mesh_id,
             "realms": node.presence.snapshot()}
    log.info("state dump %s", json.dumps(state, separators=(",", ":")))


def dump_stats(node: Node) -> None:
    log.info("runtime stats %s", json.dumps(node.stats(), separators=(",", ":")))


def reload_keys(node: Node) -> None:
    """SIGHUP: re-read PUBLIC_KEYS_FILE. New connections use the new keys; existing
    peers keep their app. A broken file keeps the old keys. Logs counts, never keys."""
    auth = node.auth
    if not auth.keys_file:
        log.info("SIGHUP: no PUBLIC_KEYS_FILE to reload (keys=%d)", len(auth.keys))
        return
    try:
        count = auth.reload()
    except ConfigError as exc:  # names the file and the entry number, never the key
        log.error("keys reload failed: %s; keeping keys=%d", exc, len(auth.keys))
        return
    except OSError as exc:
        log.error("keys reload failed: %s: %s; keeping keys=%d", auth.keys_file,
                  exc.strerror, len(auth.keys))
        return
    log.info("keys reloaded keys=%d file=%s", count, auth.keys_file)


def install_signal_handlers(loop: AbstractEventLoop, node: Node) -> None:
    loop.add_signal_handler(signal.SIGUSR1, dump_state, node)
    loop.add_signal_handler(signal.SIGUSR2, dump_stats, node)
    loop.add_signal_handler(signal.SIGHUP, reload_keys, node)


def write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def remove_pid_file(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass
