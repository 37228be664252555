"""Try etcd as one identity and report what etcd allowed: run inside a host's network namespace.

    python -m tests.support.etcd_probe --etcd HOST:PORT [--tls-ca CA --tls-cert CRT --tls-key KEY]
        ACTION [ACTION...]

Actions: ``read`` (list volumes), ``volume`` (a volume spec write), ``node:NAME`` (rewrite that
node's record), ``state:NODE`` (remove a state key of that node), ``event:WRITER`` (an event
under that writer's keys, on a 30 s lease), ``escalate`` (grant the
certificate's own user etcd's root role), ``http-put`` (a plaintext HTTP PUT through etcd's
gateway, the attack that once fenced an owner). Writes are compare-and-swap on revisions
that never match where that is possible, so an allowed write changes nothing; etcd checks
the permission of every operation of a transaction before its compares.

Prints one JSON object: action -> ``"ok"`` or ``"refused: <why>"``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

from aetcd import rpc

from ferry.cluster.keyspace import Keyspace, endpoints_client
from ferry.core.records import Event, EventKind, NodeInfo, VolumeSpec
from ferry.security.tls import TlsFiles

NEVER = 1 << 62
PROBE_VOLUME = "et-probe"
TIMEOUT = 10.0


async def _attempt(action: str, keyspace: Keyspace, endpoint: str, user: str) -> str:
    client = keyspace.client
    steps: dict[str, Callable[[], Awaitable[object]]] = {
        "read": keyspace.list_volumes,
        "volume": lambda: keyspace.update_volume(
            VolumeSpec(name=PROBE_VOLUME, size_bytes=1 << 20, node="nobody"), NEVER
        ),
    }
    kind, _, name = action.partition(":")
    try:
        if action in steps:
            await asyncio.wait_for(steps[action](), TIMEOUT)
        elif kind == "node":
            lease = await client.lease(30)
            forged = NodeInfo(
                name=name, address="10.0.0.66:7080", pool="p", free_bytes=1, version="x"
            )
            await asyncio.wait_for(keyspace.update_node(forged, lease), TIMEOUT)
        elif kind == "state":
            await asyncio.wait_for(keyspace.delete_state(name, PROBE_VOLUME), TIMEOUT)
        elif kind == "event":
            lease = await client.lease(30)
            event = Event(volume=PROBE_VOLUME, kind=EventKind.ERROR, by=name, detail="probe")
            await asyncio.wait_for(keyspace.put_event(name, event, lease), TIMEOUT)
        elif action == "escalate":
            await client.connect()
            await rpc.AuthStub(client.channel).UserGrantRole(
                rpc.AuthUserGrantRoleRequest(user=user, role="root"), timeout=TIMEOUT
            )
        elif action == "http-put":
            return await asyncio.to_thread(_http_put, endpoint)
        else:
            return f"refused: unknown action {action}"
    except Exception as error:  # every refusal, whatever layer (TLS, gRPC, etcd) says it
        return f"refused: {type(error).__name__}: {error}"
    return "ok"


def _http_put(endpoint: str) -> str:
    """A plaintext JSON PUT through etcd's gRPC gateway (no certificate, no TLS)."""
    body = json.dumps(
        {
            "key": base64.b64encode(b"/ferry/v1/owners/et-probe").decode(),
            "value": base64.b64encode(b'{"node": "intruder", "epoch": 99}').decode(),
        }
    ).encode()
    request = urllib.request.Request(f"http://{endpoint}/v3/kv/put", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            answer = reply.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return f"refused: {error}"
    return "ok" if '"revision"' in answer else f"refused: {answer.strip()[:200]}"


async def probe(
    endpoint: str, tls: TlsFiles | None, user: str, actions: list[str]
) -> dict[str, str]:
    client = endpoints_client([endpoint], tls)
    keyspace = Keyspace(client)
    try:
        return {action: await _attempt(action, keyspace, endpoint, user) for action in actions}
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--user", default="", help="the certificate's common name (escalate)")
    parser.add_argument("actions", nargs="+")
    args = parser.parse_args()
    tls = (
        TlsFiles(Path(args.tls_ca), Path(args.tls_cert), Path(args.tls_key))
        if args.tls_cert
        else None
    )
    print(json.dumps(asyncio.run(probe(args.etcd, tls, args.user, args.actions))))


if __name__ == "__main__":
    main()
