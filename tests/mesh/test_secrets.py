"""No secret ever reaches a log line or a SIGUSR1/SIGUSR2 dump: public keys (env, file,
webhook-checked, refused), the webhook URL's credentials, NATS credentials. A real
prscd process with DEBUG on (one line per message), every path that logs exercised."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.helpers import data_frame, insecure, join_frame, recv
from tests.mesh.conftest import NatsFactory
from tests.test_auth import HookServer, hook  # noqa: F401  (fixture)
from tests.test_cli import run_prscd
from tests.wt_client import wt_connect

SECRETS = {
    "env": "envkey-S3CRET-1",
    "file": "filekey-S3CRET-2",
    "hooked": "hookkey-S3CRET-3",
    "refused": "nokey-S3CRET-4",
    "broken": "errkey-S3CRET-5",
    "hook_password": "hookpw-S3CRET-6",
    "nats_password": "natspw-S3CRET-7",
    "reloaded": "newkey-S3CRET-8",
    "nats_user": "natsuser-S3CRET-9",
}


async def test_secrets_never_reach_logs_or_dumps(
        tmp_path: Path, nats_factory: NatsFactory, hook: HookServer) -> None:  # noqa: F811
    answers = {SECRETS["hooked"]: (200, b'{"app": "t"}'), SECRETS["refused"]: (403, b""),
               SECRETS["broken"]: (500, b"")}
    hook.answer = lambda body, headers: answers[body["publickey"]]
    nats = nats_factory("secrets", args=["--user", SECRETS["nats_user"],
                                         "--pass", SECRETS["nats_password"]])
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{SECRETS['file']}:t\n")
    env = {
        "DEBUG": "true",
        "PUBLIC_KEYS": f"{SECRETS['env']}:t",
        "PUBLIC_KEYS_FILE": str(keys),
        "AUTH_WEBHOOK_URL": hook.url(f"svc:{SECRETS['hook_password']}@"),
        "NATS_URL": f"nats://{SECRETS['nats_user']}:{SECRETS['nats_password']}"
                    f"@127.0.0.1:{nats.port}",
        "WEBTRANSPORT": "true",
    }
    async with run_prscd(tmp_path, **env) as proc:
        await proc.wait_log("stream-function connected", timeout=15)
        base = f"wss://127.0.0.1:{proc.port}/v1"
        open_peers = []
        for name in ("env", "file", "hooked"):
            ws = await connect(f"{base}?publickey={SECRETS[name]}&id={name}", ssl=insecure())
            await ws.send(join_frame("room", name))
            await recv(ws)
            await ws.send(data_frame("room", "m", '"hello"'))
            open_peers.append(ws)
        for name, status in (("refused", 403), ("broken", 503)):
            try:
                await connect(f"{base}?publickey={SECRETS[name]}&id={name}", ssl=insecure())
            except InvalidStatus as exc:
                assert exc.response.status_code == status
            else:
                raise AssertionError(f"{name} was admitted")
        async with wt_connect(proc.port, f"/v1?publickey={SECRETS['hooked']}&id=wt") as wt:
            assert wt.status == 200
            wt.send_datagram(join_frame("room", "wt"))
            await wt.next_message(match=lambda m: m.get("op") == "channel_join")
            keys.write_text(f"{SECRETS['reloaded']}:t\n")
            proc.proc.send_signal(signal.SIGHUP)
            await proc.wait_log("keys reloaded")
            proc.proc.send_signal(signal.SIGUSR1)
            dump = await proc.wait_log("state dump")
            proc.proc.send_signal(signal.SIGUSR2)
            await proc.wait_log("runtime stats")
        assert '"id":"hooked"' in dump and '"transport":"webtransport"' in dump
        for ws in open_peers:
            await ws.close()
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.proc.wait(), 10)
        await asyncio.sleep(0.1)
    text = "\n".join(proc.log)
    assert "auth webhook failed" in text and "frame sid=" in text  # the paths did log
    leaked = [name for name, secret in SECRETS.items() if secret in text]
    assert not leaked, f"secrets in the log: {leaked}"
    assert "S3CRET" not in text
