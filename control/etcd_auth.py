"""etcd's users and roles for Ferry, and the one bootstrap that creates them and turns auth on.

etcd takes a client's user from its certificate's common name (no password):
``control`` for ferry-control, the node's name for its agent, ``root`` for the
administrator that runs this bootstrap. Anyone else, including a ferryctl
user's certificate, is refused by etcd. The role table below is the one place
that says who writes what; every role reads everything under the prefix
(agents and control watch the whole prefix).

The bootstrap is idempotent: run it again with more nodes to add them, or after
the table changed (a right no longer listed is revoked).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aetcd
import click
import grpc
from aetcd import rpc

from ferry.cluster.events import CONTROL_WRITER
from ferry.cluster.keyspace import DEFAULT_PREFIX, KeyRange, endpoints_client, grant_range
from ferry.security.tls import TlsFiles, endpoints

log = logging.getLogger(__name__)

ROOT = "root"
CONTROL_USER = "control"
CONTROL_ROLE = "ferry-control"
NODE_ROLE_PREFIX = "ferry-node-"
RPC_TIMEOUT = 10.0
READ = rpc.Permission.READ
WRITE = rpc.Permission.WRITE


@dataclass(frozen=True)
class Right:
    """Write access to the keys of ``kind``: all of them, or (``own``) only the node's own.

    ``shared`` says why a node must write keys that are not its own.
    """

    kind: str
    own: bool = False
    shared: str = ""


# Own keys of control are its events' (events/control/...).
CONTROL_WRITES = (
    Right("volumes"),
    Right("moves"),
    Right("drops"),
    Right(
        "owners",
        shared="to remove a purged volume's owner with its spec and move, and for a "
        "failover, which hands a volume whose owner's node is down to a standby copy "
        "(the one write of owners/ that the owner itself cannot make)",
    ),
    Right("events", own=True),
)

NODE_WRITES = (
    Right("nodes", own=True),
    Right("seen", own=True),
    Right("state", own=True),
    Right("asides", own=True),
    Right("drops", own=True),
    Right("events", own=True),
    Right(
        "owners",
        shared="the ownership compare-and-swap: an agent claims a new volume's first epoch, "
        "and a move's source hands the volume over to the target",
    ),
    Right("moves", shared="the source agent advances the move it runs"),
    Right(
        "mounts",
        shared="mounts/<volume>/<node> names the volume first, so etcd cannot grant one "
        "node's mounts alone; a forged mount record only blocks a delete or move",
    ),
)


class BootstrapError(Exception):
    """etcd refused a step of the bootstrap; the message says which and what to do."""


def node_role(node: str) -> str:
    return f"{NODE_ROLE_PREFIX}{node}"


def wanted_permissions(
    prefix: str, writes: Iterable[Right], node: str = ""
) -> set[tuple[int, KeyRange]]:
    """(type, range) pairs of a role: read of the whole prefix, then its writes."""
    wanted = {(READ, grant_range(prefix))}
    for right in writes:
        wanted.add((WRITE, grant_range(prefix, right.kind, node if right.own else "")))
    return wanted


def roles(prefix: str, nodes: Sequence[str]) -> dict[str, tuple[str, set[tuple[int, KeyRange]]]]:
    """Every role Ferry needs: role name -> (its user, its permissions)."""
    for node in nodes:
        if node in (ROOT, CONTROL_USER):
            raise BootstrapError(
                f"a node cannot be named {node!r}: etcd would take it for that user"
            )
    table = {
        CONTROL_ROLE: (CONTROL_USER, wanted_permissions(prefix, CONTROL_WRITES, CONTROL_WRITER))
    }
    for node in nodes:
        table[node_role(node)] = (node, wanted_permissions(prefix, NODE_WRITES, node))
    return table


def _refused(what: str, error: grpc.aio.AioRpcError) -> BootstrapError:
    return BootstrapError(
        f"etcd refused to {what}: {error.details()}; run the bootstrap with the "
        "etcd-root certificate (ferryctl ca issue --kind etcd-root --name root)"
    )


async def _call(what: str, method: grpc.aio.UnaryUnaryMultiCallable, request: object) -> object:
    try:
        return await method(request, timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        raise _refused(what, error) from error


async def _ensure(what: str, method: grpc.aio.UnaryUnaryMultiCallable, request: object) -> None:
    """Create a user or role unless it exists."""
    try:
        await method(request, timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        if "already exists" not in (error.details() or ""):
            raise _refused(what, error) from error


async def _user(auth: rpc.AuthStub, name: str, role: str) -> None:
    options = rpc.UserAddOptions(no_password=True)
    await _ensure(
        f"add user {name}", auth.UserAdd, rpc.AuthUserAddRequest(name=name, options=options)
    )
    await _call(
        f"grant role {role} to {name}",
        auth.UserGrantRole,
        rpc.AuthUserGrantRoleRequest(user=name, role=role),
    )


async def _role(
    auth: rpc.AuthStub, name: str, prefix: str, wanted: set[tuple[int, KeyRange]]
) -> None:
    """The role with exactly ``wanted`` under ``prefix``: missing grants added, others under
    it revoked (grants under another prefix, another Ferry cluster's, stay)."""
    await _ensure(f"add role {name}", auth.RoleAdd, rpc.AuthRoleAddRequest(name=name))
    current = await _call(f"read role {name}", auth.RoleGet, rpc.AuthRoleGetRequest(role=name))
    have = {(p.permType, KeyRange(p.key, p.range_end)) for p in current.perm}  # type: ignore[attr-defined]
    wanted_ranges = {keys for _, keys in wanted}
    ours = grant_range(prefix).key
    for keys in {keys for _, keys in have if keys.key.startswith(ours)} - wanted_ranges:
        await _call(
            f"revoke {keys.key!r} from {name}",
            auth.RoleRevokePermission,
            rpc.AuthRoleRevokePermissionRequest(role=name, key=keys.key, range_end=keys.range_end),
        )
    for perm_type, keys in wanted - have:
        permission = rpc.Permission(permType=perm_type, key=keys.key, range_end=keys.range_end)
        await _call(
            f"grant {keys.key!r} to {name}",
            auth.RoleGrantPermission,
            rpc.AuthRoleGrantPermissionRequest(name=name, perm=permission),
        )


async def bootstrap(client: aetcd.Client, prefix: str, nodes: Sequence[str]) -> None:
    """Create root, control's and each node's user and role, then enable auth.

    ``client`` must be connected as ``root`` (the etcd-root certificate) once
    auth is on; before that, any certificate of the cluster CA may run it.
    """
    table = roles(prefix, nodes)
    await client.connect()
    auth = rpc.AuthStub(client.channel)
    await _user(auth, ROOT, ROOT)
    for role, (user, wanted) in table.items():
        await _role(auth, role, prefix, wanted)
        await _user(auth, user, role)
    await _call("enable auth", auth.AuthEnable, rpc.AuthEnableRequest())
    log.info(
        "etcd auth enabled: prefix=%s users=%s", prefix, ",".join(u for u, _ in table.values())
    )


@click.command(context_settings={"auto_envvar_prefix": "FERRY", "show_default": True})
@click.option("--etcd", required=True, help="etcd endpoints, HOST:PORT[,HOST:PORT...].")
@click.option("--tls-ca", required=True, help="Cluster CA certificate (PEM).")
@click.option("--tls-cert", required=True, help="The etcd-root certificate (PEM).")
@click.option("--tls-key", required=True, help="The etcd-root private key (PEM).")
@click.option("--etcd-prefix", default=DEFAULT_PREFIX, help="Key prefix of Ferry's state.")
@click.option(
    "--node", "nodes", multiple=True, envvar="FERRY_NODE", help="A node's name (repeatable)."
)
def main(
    etcd: str, tls_ca: str, tls_cert: str, tls_key: str, etcd_prefix: str, nodes: tuple[str, ...]
) -> None:
    """Create Ferry's etcd users and roles and enable etcd auth (idempotent)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tls = TlsFiles(Path(tls_ca), Path(tls_cert), Path(tls_key))

    async def run() -> None:
        client = await asyncio.to_thread(endpoints_client, endpoints(etcd), tls)
        try:
            await bootstrap(client, etcd_prefix, nodes)
        finally:
            await client.close()

    try:
        asyncio.run(run())
    except (BootstrapError, ValueError, FileNotFoundError) as error:
        click.echo(f"ferry-etcd-bootstrap: {error}", err=True)
        sys.exit(1)
