"""The Docker volume plugin (protocol ``VolumeDriver``), served by the agent on a Unix socket.

Docker calls it to create, mount and remove volumes. ``Mount`` on a host
that does not own the volume asks control to move it here and waits, but
returns inside Docker's two-minute limit: mounted, or with an error that
says how far the move is, so that a retry succeeds once it is done.

Mounts are counted by Docker's request ``ID``, kept on local disk
(``agent.usage.DockerMounts``) so that an agent restart forgets none. A
Mount records its ID first (refused while a handoff of the volume runs
here), then mounts, then publishes the mount record in etcd (which blocks a
delete); if any step fails, the ID and the record are taken back and Docker
gets the reason. The record is released when the last container lets go,
and the dataset is unmounted then unless something else here still holds
it (``agent.usage.unmount_unused``; convergence retries what is left): a
volume is mounted only while it is used. Whether a move may hand off is
decided from the kernel's view, not from the record
(``agent.replication.source``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from agent.store import VolumeStore
from agent.usage import DockerMounts, HandoffRunning, mount_records, unmount_unused
from ferry.cluster.keyspace import Keyspace, Versioned
from ferry.core.fencing import DEFAULT_LEASE_TTL_SECONDS
from ferry.core.records import MovePhase, Owner, VolumeSpec

log = logging.getLogger(__name__)

MOUNT_WAIT_SECONDS = 100.0
# A Mount waiting for a move polls etcd (and ZFS only once the volume is owned here):
# whatever it waits past the activation adds to the container's pause.
POLL_SECONDS = 0.1
REPLICATION_OPTIONS = ("replicas", "rpo", "replace_after")
FAILOVER_OPTIONS = ("failover", "failover_after")
KNOWN_OPTIONS = frozenset({"size", "compression", "node", *REPLICATION_OPTIONS, *FAILOVER_OPTIONS})


class PluginError(Exception):
    """An error Docker shows to the user as it is."""


class ControlApi(Protocol):
    """What the plugin asks of ferry-control; errors are raised as PluginError."""

    async def create_volume(
        self,
        name: str,
        size: str,
        compression: str,
        node: str,
        replication: Mapping[str, str],
        failover: str = "",
        failover_after: float = 0.0,
    ) -> None:
        """``replication``: the ``replicas``, ``rpo`` and ``replace_after`` options given."""

    async def delete_volume(self, name: str) -> None: ...

    async def move_volume(self, name: str, node: str) -> None: ...


@dataclass
class VolumePlugin:
    """The plugin's behaviour, independent of HTTP."""

    node: str
    keyspace: Keyspace
    store: VolumeStore
    control: ControlApi
    lease: Callable[[], Any]
    mounts: DockerMounts
    lease_ttl: int = DEFAULT_LEASE_TTL_SECONDS
    """The cluster's lease TTL (the same on every host): a lost owner's lease lasts this long."""

    def __post_init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self.ready = False
        """Set once the agent's start-up is done; until then every volume call is refused."""

    def refuse_while_starting(self) -> None:
        """PluginError while the agent starts: Docker shows it, and no ``local`` volume is made."""
        if not self.ready:
            raise PluginError(f"ferry agent on {self.node} is starting; retry in a few seconds")

    async def create(self, name: str, opts: dict[str, str]) -> None:
        unknown = sorted(set(opts) - KNOWN_OPTIONS)
        if unknown:
            raise PluginError(
                f"unknown option(s) {', '.join(unknown)}; Ferry takes "
                f"{', '.join(sorted(KNOWN_OPTIONS))} (e.g. -o size=1G)"
            )
        try:
            failover_after = float(opts.get("failover_after") or 0)
        except ValueError:
            raise PluginError(
                f"failover_after={opts['failover_after']!r} is not a number of seconds "
                "(e.g. -o failover_after=30)"
            ) from None
        await self.control.create_volume(
            name,
            opts.get("size", ""),
            opts.get("compression", ""),
            opts.get("node", ""),
            {key: opts[key] for key in REPLICATION_OPTIONS if key in opts},
            opts.get("failover", ""),
            failover_after,
        )

    async def remove(self, name: str) -> None:
        await self.control.delete_volume(name)

    async def mount(self, name: str, request_id: str) -> str:
        async with self._lock(name):
            await self._wait_until_owned_here(name)
            try:
                await self.mounts.add(name, request_id)
            except HandoffRunning:
                move = await self.keyspace.get_move(name)
                target = move.value.target if move is not None else "its new host"
                raise PluginError(
                    f"volume {name} is being handed off to {target}; run the container there"
                ) from None
            try:
                await self.store.ensure_mounted(name)
                await self._publish(name)
            except Exception as error:
                await self._take_back(name, request_id)
                raise PluginError(
                    f"volume {name} could not be mounted on {self.node}: {error}; "
                    "nothing was changed, retry when the cause is fixed"
                ) from error
        log.info(
            "mounted: volume=%s id=%s containers=%d",
            name,
            request_id,
            len(self.mounts.ids(name)),
        )
        return str(self.store.mountpoint(name))

    async def unmount(self, name: str, request_id: str) -> None:
        async with self._lock(name):
            await self._release(name, request_id)
            try:
                held = await unmount_unused(name, self.mounts, self.store)
            except Exception as error:
                # Docker's Unmount is done either way: the next convergence pass retries.
                log.warning(
                    "dataset not unmounted after the last Unmount: volume=%s error=%s; "
                    "convergence tries again",
                    name,
                    error,
                )
                held = [str(error)]
        log.info(
            "unmount: volume=%s id=%s dataset=%s",
            name,
            request_id,
            f"still mounted ({'; '.join(held)})" if held else "unmounted",
        )

    async def path(self, name: str) -> str:
        """The mountpoint while the dataset is mounted here, else "" (as Docker shows it)."""
        return self._path(name, await self.store.mounted_here())

    def _path(self, name: str, mounted: set[str]) -> str:
        return str(self.store.mountpoint(name)) if name in mounted else ""

    async def get(self, name: str) -> dict[str, Any]:
        spec = await self.keyspace.get_volume(name)
        if spec is None or spec.value.deleted:
            raise PluginError(f"volume {name} does not exist")
        return {
            "Name": name,
            "Mountpoint": await self.path(name),
            "CreatedAt": _rfc3339(spec.value.created_at),
            "Status": await self._status(name),
        }

    async def list(self) -> list[dict[str, Any]]:
        mounted = await self.store.mounted_here()
        return [
            {
                "Name": v.value.name,
                "Mountpoint": self._path(v.value.name, mounted),
                "CreatedAt": _rfc3339(v.value.created_at),
            }
            for v in await self.keyspace.list_volumes()
            if not v.value.deleted
        ]

    async def _status(self, name: str) -> dict[str, Any]:
        owner = await self.keyspace.get_owner(name)
        move = await self.keyspace.get_move(name)
        status: dict[str, Any] = {
            "owner": owner.value.node if owner else "",
            "epoch": owner.value.epoch if owner else 0,
        }
        if move is not None:
            status.update(
                move_phase=move.value.phase.value,
                move_from=move.value.source,
                move_to=move.value.target,
                move_bytes_sent=move.value.bytes_sent,
                move_bytes_total=move.value.bytes_total,
                move_error=move.value.error,
            )
        return status

    async def _publish(self, name: str) -> None:
        """Write (or remove) this node's mount record of the volume, from the truth."""
        record = (await mount_records(self.node, [name], self.mounts, self.store)).get(name)
        if record is None:
            await self.keyspace.delete_mount(name, self.node)
        else:
            await self.keyspace.put_mount(record, self.lease())

    async def _take_back(self, name: str, request_id: str) -> None:
        """Undo a Mount that failed half-way: the ID first (local, certain), then the dataset's
        mount (unless something else holds it) and the record."""
        await self.mounts.discard(name, request_id)
        try:
            await unmount_unused(name, self.mounts, self.store)
            await self._publish(name)
        except Exception as error:
            log.warning(
                "mount not taken back: volume=%s error=%s; the next convergence pass unmounts "
                "it if unused and rewrites its record from what the kernel shows",
                name,
                error,
            )

    async def _release(self, name: str, request_id: str) -> None:
        await self.mounts.discard(name, request_id)
        await self._publish(name)

    async def _wait_until_owned_here(self, name: str) -> None:
        spec = await self.keyspace.get_volume(name)
        if spec is None or spec.value.deleted:
            raise PluginError(f"volume {name} does not exist (deleted?); create it first")
        deadline = time.monotonic() + MOUNT_WAIT_SECONDS
        owner = await self.keyspace.get_owner(name)
        if (
            owner is not None
            and owner.value.node != self.node
            and await self.keyspace.get_node(owner.value.node) is None
        ):
            owner = await self._wait_for_failover(spec.value, owner.value, deadline)
        if owner is not None and owner.value.node != self.node:
            await self.control.move_volume(name, self.node)
            log.info("mount asked for a move: volume=%s from=%s", name, owner.value.node)
        while time.monotonic() < deadline:
            owner = await self.keyspace.get_owner(name)
            if owner is None:
                await self._refuse_if_create_failed(name)
            if (
                owner is not None
                and owner.value.node == self.node
                and await self.store.is_writable(name)
            ):
                return
            await asyncio.sleep(POLL_SECONDS)
        raise PluginError(await self._still_moving(name))

    async def _wait_for_failover(
        self, spec: VolumeSpec, lost: Owner, deadline: float
    ) -> Versioned[Owner] | None:
        """The owner's node is down: a move cannot copy from it. With ``failover: auto``
        wait (inside Docker's limit) for control to promote a copy, and return the new
        owner; else PluginError saying to run the failover."""
        name = spec.name
        if spec.failover != "auto":
            raise PluginError(
                f"volume {name}'s owner {lost.node} is down, and its failover is manual: run "
                f"'ferryctl volume failover {name}' (--to {self.node} for this host's copy), "
                f"then start the container again; or start {lost.node} again"
            )
        due = self.lease_ttl + spec.failover_after
        if due > MOUNT_WAIT_SECONDS:
            raise PluginError(
                f"volume {name}'s owner {lost.node} is down; its auto failover comes up to "
                f"{due:.0f} s after the loss, longer than Docker waits for a mount: start the "
                f"container again then, or run 'ferryctl volume failover {name}' now"
            )
        log.info("mount waits for the auto failover: volume=%s lost=%s", name, lost.node)
        while time.monotonic() < deadline:
            owner = await self.keyspace.get_owner(name)
            if owner is not None and owner.value != lost:
                return owner
            await asyncio.sleep(POLL_SECONDS * 10)
        raise PluginError(
            f"volume {name}'s owner {lost.node} is down and no auto failover happened in "
            f"{MOUNT_WAIT_SECONDS:.0f} s (is ferry-control running? 'ferryctl volume get "
            f"{name}' says why); run 'ferryctl volume failover {name}'"
        )

    async def _refuse_if_create_failed(self, name: str) -> None:
        spec = await self.keyspace.get_volume(name)
        if spec is not None and spec.value.create_error:
            raise PluginError(
                f"volume {name} could not be created on {spec.value.node}: "
                f"{spec.value.create_error}; remove it and create it again with a size "
                f"the node can hold"
            )

    async def _still_moving(self, name: str) -> str:
        move = await self.keyspace.get_move(name)
        if move is None:
            return f"volume {name} is not ready on {self.node} yet; retry in a few seconds"
        m = move.value
        done = f"{m.bytes_sent >> 20} of {m.bytes_total >> 20} MiB" if m.bytes_total else "starting"
        waiting = (
            f"; a container on {m.source} still uses it: stop it there"
            if m.phase == MovePhase.WAITING_FOR_UNMOUNT
            else ""
        )
        error = f"; last error: {m.error}" if m.error else ""
        return (
            f"volume {name} is still moving from {m.source} to {m.target} "
            f"(phase {m.phase.value}, {done}){waiting}{error}; the move continues, "
            f"retry when 'ferryctl move status {name}' says done"
        )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


Handler = Callable[[VolumePlugin, dict[str, Any]], Awaitable[dict[str, Any]]]


def _rfc3339(when: float) -> str:
    """A Unix time as Docker reads a volume's CreatedAt (RFC 3339, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


async def _activate(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Implements": ["VolumeDriver"]}


async def _capabilities(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Capabilities": {"Scope": "global"}}


async def _create(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    await plugin.create(body["Name"], body.get("Opts") or {})
    return {}


async def _remove(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    await plugin.remove(body["Name"])
    return {}


async def _mount(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Mountpoint": await plugin.mount(body["Name"], body.get("ID", ""))}


async def _unmount(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    await plugin.unmount(body["Name"], body.get("ID", ""))
    return {}


async def _path(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Mountpoint": await plugin.path(body["Name"])}


async def _get(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Volume": await plugin.get(body["Name"])}


async def _list(plugin: VolumePlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Volumes": await plugin.list()}


ROUTES: dict[str, Handler] = {
    "/Plugin.Activate": _activate,
    "/VolumeDriver.Capabilities": _capabilities,
    "/VolumeDriver.Create": _create,
    "/VolumeDriver.Remove": _remove,
    "/VolumeDriver.Mount": _mount,
    "/VolumeDriver.Unmount": _unmount,
    "/VolumeDriver.Path": _path,
    "/VolumeDriver.Get": _get,
    "/VolumeDriver.List": _list,
}


# Answered while the agent starts, so Docker knows the driver and gets its refusals.
HANDSHAKE = frozenset({"/Plugin.Activate", "/VolumeDriver.Capabilities"})


def make_app(plugin: VolumePlugin) -> web.Application:
    """An aiohttp application answering Docker's plugin calls; errors become ``{"Err": ...}``."""

    def endpoint(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def respond(request: web.Request) -> web.Response:
            try:
                if request.path not in HANDSHAKE:
                    plugin.refuse_while_starting()
                body = json.loads(await request.read() or b"{}")
                reply = await handler(plugin, body or {})
                return web.json_response({"Err": "", **reply}, content_type=CONTENT_TYPE)
            except PluginError as error:
                log.warning("plugin call refused: path=%s error=%s", request.path, error)
                return web.json_response({"Err": str(error)}, content_type=CONTENT_TYPE)
            except (KeyError, ValueError) as error:
                return web.json_response(
                    {"Err": f"bad request to {request.path}: {error}"}, content_type=CONTENT_TYPE
                )
            except Exception as error:
                log.exception("plugin call failed: path=%s", request.path)
                return web.json_response(
                    {"Err": f"ferry agent on {plugin.node} failed {request.path}: {error}"},
                    content_type=CONTENT_TYPE,
                )

        return respond

    app = web.Application()
    for path, handler in ROUTES.items():
        app.router.add_post(path, endpoint(handler))
    return app


CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"


async def serve(plugin: VolumePlugin, socket_path: Path) -> web.AppRunner:
    """Start serving on ``socket_path`` (replacing a stale socket file)."""
    await asyncio.to_thread(replace_socket_file, socket_path)
    runner = web.AppRunner(make_app(plugin))
    await runner.setup()
    await web.UnixSite(runner, str(socket_path)).start()
    log.info("docker plugin listening: socket=%s", socket_path)
    return runner


def replace_socket_file(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
