"""ferry-plugin-forward: the process of Ferry's managed (v2) Docker plugin.

It answers Docker's volume-plugin calls on the plugin's socket by asking the
host's ferry-agent on the agent's own plugin socket, so ZFS, etcd and control
stay with the agent (docs/deploy.md, "The Docker plugin"). One thing cannot be
forwarded as is: Docker looks for a managed plugin's mountpoints inside the
plugin's root filesystem, where only the propagated mount reaches the host.
So a Mount binds the agent's mountpoint (visible here through the host's mount
root, mounted rslave so new mounts appear) to ``MOUNT_ROOT/NAME`` and answers
with that path. The bind is made on a volume's first Mount and removed at its
last Unmount *before* the agent is told, so the agent never finds its dataset
held open by a bind it does not know about.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
from aiohttp import web

from agent.plugin import replace_socket_file
from ferry.logs import setup_logging

log = logging.getLogger("ferry.plugin_forward")

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
AGENT_CALL_TIMEOUT_SECONDS = 600.0  # a Mount waits for a move to this host to finish
MOUNT_ANSWER_SECONDS = 25.0  # below Docker's 30 s for a plugin call
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2


class ForwardError(Exception):
    """A call could not be completed here; the message tells the operator what to do."""


def _bind(source: Path, target: Path) -> None:
    """Binds ``source`` on ``target`` unless a bind is there already (from before a restart)."""
    if os.path.ismount(target):
        return
    target.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND | MS_REC, None) != 0:
        error = ctypes.get_errno()
        raise ForwardError(f"bind-mounting {source} on {target} failed: {os.strerror(error)}")


def _unbind(target: Path) -> None:
    if not os.path.ismount(target):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise ForwardError(f"unmounting {target} failed: {os.strerror(error)}")
    target.rmdir()


@dataclass
class Forwarder:
    """Forwards plugin calls to the agent and keeps one bind per mounted volume."""

    agent_socket: Path
    agent_mount_root: Path
    seen_mount_root: Path
    mount_root: Path
    _ids: dict[str, set[str]] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _abandoned: set[asyncio.Task[dict[str, Any]]] = field(default_factory=set)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call to the agent's plugin socket; its reply, ``Err`` included."""
        connector = aiohttp.UnixConnector(path=str(self.agent_socket))
        timeout = aiohttp.ClientTimeout(total=AGENT_CALL_TIMEOUT_SECONDS)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.post(f"http://agent{path}", json=body) as response,
            ):
                reply: dict[str, Any] = json.loads(await response.read())
                return reply
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise ForwardError(
                f"the ferry agent's plugin socket {self.agent_socket} did not answer {path} "
                f"({error or type(error).__name__}); start ferry-agent on this host and check "
                "that the plugin's agent-socket mount is its socket's directory"
            ) from error

    def target(self, name: str) -> Path:
        return self.mount_root / name

    def seen(self, agent_mountpoint: str) -> Path:
        """Where the agent's mountpoint is visible inside the plugin."""
        try:
            relative = Path(agent_mountpoint).relative_to(self.agent_mount_root)
        except ValueError:
            raise ForwardError(
                f"the agent mounted the volume at {agent_mountpoint}, outside "
                f"FERRY_AGENT_MOUNT_ROOT={self.agent_mount_root}; set the plugin's "
                "FERRY_AGENT_MOUNT_ROOT and agent-mnt.source to the agent's --mount-root"
            ) from None
        return self.seen_mount_root / relative

    async def mount(self, body: dict[str, Any]) -> dict[str, Any]:
        """Docker gives a plugin call 30 s and then forgets it, while the agent's Mount may
        wait longer for a move to this host. An answer is therefore given within
        ``MOUNT_ANSWER_SECONDS``; a Mount that completes after it is undone (Unmount with
        its ID), because no container will ever unmount it and it would pin the volume."""
        task = asyncio.create_task(self._mount(body))
        try:
            return await asyncio.wait_for(asyncio.shield(task), MOUNT_ANSWER_SECONDS)
        except TimeoutError:
            self._abandoned.add(task)
            task.add_done_callback(lambda done: self._undo_late_mount(done, body))
            return {
                "Err": f"volume {body['Name']} is not ready on this host yet (moving here?); "
                f"the move continues, retry when 'ferryctl move status {body['Name']}' says done"
            }

    def _undo_late_mount(self, task: asyncio.Task[dict[str, Any]], body: dict[str, Any]) -> None:
        if task.cancelled() or task.exception() is not None or task.result().get("Err"):
            self._abandoned.discard(task)
            return
        log.info("undoing a mount Docker gave up on: volume=%s id=%s", body["Name"], body.get("ID"))
        undo = asyncio.create_task(self.unmount(body))
        self._abandoned.add(undo)
        undo.add_done_callback(self._abandoned.discard)
        self._abandoned.discard(task)

    async def _mount(self, body: dict[str, Any]) -> dict[str, Any]:
        name, request_id = body["Name"], body.get("ID", "")
        async with self._lock(name):
            reply = await self.call("/VolumeDriver.Mount", body)
            if reply.get("Err"):
                return reply
            target = self.target(name)
            if not self._ids.get(name):
                try:
                    await asyncio.to_thread(_bind, self.seen(reply["Mountpoint"]), target)
                except ForwardError:
                    await self.call("/VolumeDriver.Unmount", body)
                    raise
            self._ids.setdefault(name, set()).add(request_id)
        log.info("mounted: volume=%s id=%s mountpoint=%s", name, request_id, target)
        return {**reply, "Mountpoint": str(target)}

    async def unmount(self, body: dict[str, Any]) -> dict[str, Any]:
        name, request_id = body["Name"], body.get("ID", "")
        async with self._lock(name):
            ids = self._ids.get(name, set())
            ids.discard(request_id)
            if not ids:
                self._ids.pop(name, None)
                await asyncio.to_thread(_unbind, self.target(name))
            reply = await self.call("/VolumeDriver.Unmount", body)
        log.info("unmounted: volume=%s id=%s", name, request_id)
        return reply

    def docker_mountpoint(self, name: str) -> str:
        """Where Docker finds the volume: its bind while one exists, else nothing."""
        return str(self.target(name)) if name in self._ids else ""

    def shown(self, volume: dict[str, Any]) -> dict[str, Any]:
        return {**volume, "Mountpoint": self.docker_mountpoint(volume["Name"])}

    async def forward(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.call(path, body)
        if path == "/VolumeDriver.Path" and not reply.get("Err"):
            return {**reply, "Mountpoint": self.docker_mountpoint(body["Name"])}
        if path == "/VolumeDriver.Get" and isinstance(reply.get("Volume"), dict):
            return {**reply, "Volume": self.shown(reply["Volume"])}
        if path == "/VolumeDriver.List" and isinstance(reply.get("Volumes"), list):
            return {**reply, "Volumes": [self.shown(v) for v in reply["Volumes"]]}
        return reply

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def make_app(forwarder: Forwarder) -> web.Application:
    """Docker's calls: Activate answered here (Docker asks it before the agent may be up),
    Mount and Unmount with their binds, everything else passed through."""

    async def activate(body: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": ["VolumeDriver"]}

    special: dict[str, Handler] = {
        "/Plugin.Activate": activate,
        "/VolumeDriver.Mount": forwarder.mount,
        "/VolumeDriver.Unmount": forwarder.unmount,
    }

    async def respond(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"{}") or {}
            handler = special.get(request.path)
            reply = await (handler(body) if handler else forwarder.forward(request.path, body))
        except ForwardError as error:
            log.warning("plugin call refused: path=%s error=%s", request.path, error)
            reply = {"Err": str(error)}
        except (KeyError, ValueError) as error:
            reply = {"Err": f"bad request to {request.path}: {error}"}
        return web.json_response(reply, content_type=CONTENT_TYPE)

    app = web.Application()
    app.router.add_post("/{call:.*}", respond)
    return app


async def run(forwarder: Forwarder, socket_path: Path) -> None:
    await asyncio.to_thread(replace_socket_file, socket_path)
    runner = web.AppRunner(make_app(forwarder), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(socket_path)).start()
    log.info(
        "plugin forwarder listening: socket=%s agent_socket=%s",
        socket_path,
        forwarder.agent_socket,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@click.command(context_settings={"auto_envvar_prefix": "FERRY", "show_default": True})
@click.option(
    "--plugin-socket",
    type=click.Path(path_type=Path),
    default=Path("/run/docker/plugins/ferry.sock"),
    help="The socket Docker connects to (config.json's interface.socket).",
)
@click.option(
    "--agent-socket",
    type=click.Path(path_type=Path),
    default=Path("/run/ferry-agent/ferry.sock"),
    help="The host agent's plugin socket as mounted in the plugin.",
)
@click.option(
    "--agent-mount-root",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/ferry/mnt"),
    help="The agent's --mount-root on the host: the prefix of the mountpoints it answers.",
)
@click.option(
    "--seen-mount-root",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/ferry/mnt"),
    help="Where the host's agent mount root is mounted in the plugin (its own path).",
)
@click.option(
    "--mount-root",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/ferry/plugin-mnt"),
    help="The plugin's propagated mount: where volumes are bound for Docker.",
)
@click.option("--log-level", default="info", help="debug, info or warning.")
def main(
    plugin_socket: Path,
    agent_socket: Path,
    agent_mount_root: Path,
    seen_mount_root: Path,
    mount_root: Path,
    log_level: str,
) -> None:
    """Serve Docker's volume-plugin calls by forwarding them to this host's ferry-agent."""
    setup_logging(log_level)
    forwarder = Forwarder(agent_socket, agent_mount_root, seen_mount_root, mount_root)
    asyncio.run(run(forwarder, plugin_socket))
