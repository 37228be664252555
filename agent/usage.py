"""Whether a volume is in use on this host: Docker's mount IDs (kept on disk) and the kernel's view.

Docker's mount IDs say which containers asked for the volume; they are
written to a file before a Mount answers and survive an agent restart, so
the last Unmount is still known as the last. The kernel says who really
holds the filesystem (``agent.zfs.inuse``): a container's bind mount in its
own mount namespace, a shell in the mountpoint, a writer outside Docker.
A volume is in use while the kernel shows any user, or while a mount ID
is younger than ``BIND_GRACE_SECONDS`` (Docker asks for the mount, then
makes the container's bind mount: the kernel sees nothing in between). An
older ID that the kernel does not back is stale (its container is gone
without an Unmount, e.g. dockerd was killed) and is only counted.

What keeps a volume's dataset mounted is wider than what keeps a move
waiting: every recorded mount ID, of any age, or any user the kernel shows
(``holders``). A Mount ID stands for a container (or an operator's Mount
through the plugin socket) until its Unmount; only then may the dataset go.

The handoff gate closes the race between a handoff and a new Mount: both
run on the agent's one event loop and check-and-set without awaiting, so a
Mount either lands before the handoff starts (and the handoff sees its ID)
or is refused while the handoff runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from agent.store import VolumeStore
from agent.zfs.inuse import User
from ferry.core.records import MountRecord

log = logging.getLogger(__name__)

BIND_GRACE_SECONDS = 30.0


class HandoffRunning(Exception):
    """A Mount arrived while this host hands the volume off."""


class DockerMounts:
    """Docker's mount IDs per volume, persisted in one JSON file, plus the handoff gate."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._ids: dict[str, dict[str, float]] = {}
        self._handoffs: set[str] = set()
        self._write_lock = asyncio.Lock()

    async def load(self) -> None:
        """Read the IDs a previous run of the agent recorded (none on first start)."""
        self._ids = await asyncio.to_thread(self._read)
        for volume, ids in self._ids.items():
            log.info("docker mounts recovered: volume=%s ids=%d", volume, len(ids))

    def ids(self, volume: str) -> tuple[str, ...]:
        return tuple(sorted(self._ids.get(volume, {})))

    def volumes(self) -> set[str]:
        return set(self._ids)

    async def add(self, volume: str, request_id: str) -> None:
        """Record a Mount; refused while a handoff of the volume runs."""
        if volume in self._handoffs:
            raise HandoffRunning(volume)
        self._ids.setdefault(volume, {})[request_id] = time.time()
        await self._save()

    async def discard(self, volume: str, request_id: str) -> None:
        ids = self._ids.get(volume, {})
        ids.pop(request_id, None)
        if not ids:
            self._ids.pop(volume, None)
        await self._save()

    def in_use(self, volume: str, kernel_users: list[User]) -> list[str]:
        """What keeps the volume in use, for the operator; empty when nothing does."""
        reasons = [user.describe() for user in kernel_users]
        now = time.time()
        reasons += [
            f"docker mount {request_id[:12] or '(no id)'} {now - since:.0f}s old"
            for request_id, since in self._ids.get(volume, {}).items()
            if not kernel_users and now - since < BIND_GRACE_SECONDS
        ]
        return reasons

    def holders(self, volume: str, kernel_users: list[User]) -> list[str]:
        """What keeps the volume's dataset mounted, for the operator; empty when nothing does.

        Every mount ID counts until its Unmount, however old: a stale one (dockerd killed
        without an Unmount) keeps one dataset mounted, where dropping a live one would
        pull the dataset from under a container whose bind the kernel does not show yet.
        """
        return [user.describe() for user in kernel_users] + [
            f"mount {request_id[:12] or '(no id)'}" for request_id in self.ids(volume)
        ]

    def begin_handoff(self, volume: str) -> None:
        """Close the gate: from now on a Mount of the volume is refused (HandoffRunning)."""
        self._handoffs.add(volume)

    def end_handoff(self, volume: str) -> None:
        self._handoffs.discard(volume)

    async def _save(self) -> None:
        snapshot = {volume: dict(ids) for volume, ids in self._ids.items()}
        async with self._write_lock:
            await asyncio.to_thread(self._write, snapshot)

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.error(
                "docker mount IDs unreadable, starting without them: path=%s error=%s; "
                "the kernel's view of mounts still protects volumes in use",
                self._path,
                error,
            )
            return {}
        return {str(v): {str(i): float(t) for i, t in ids.items()} for v, ids in data.items()}

    def _write(self, snapshot: dict[str, dict[str, float]]) -> None:
        """Atomic: a crash leaves the old file or the new one, never half of one."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_suffix(".tmp")
        with open(temporary, "w") as out:
            json.dump(snapshot, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self._path)


async def unmount_unused(volume: str, mounts: DockerMounts, store: VolumeStore) -> list[str]:
    """Unmount the volume's dataset here if nothing holds it (``DockerMounts.holders``);
    returns what still does. See ``VolumeStore.unmount_unused``."""
    return await store.unmount_unused(volume, lambda users: mounts.holders(volume, users))


async def volumes_in_use(
    volumes: Iterable[str], mounts: DockerMounts, store: VolumeStore
) -> frozenset[str]:
    """Those of ``volumes`` that something here holds (one read of the kernel's view)."""
    names = list(volumes)
    if not names:
        return frozenset()
    users = await store.users(names)
    return frozenset(name for name in names if mounts.holders(name, users[name]))


async def mount_records(
    node: str, volumes: Iterable[str], mounts: DockerMounts, store: VolumeStore
) -> dict[str, MountRecord]:
    """The mount records this node should publish: every volume with Docker IDs or users."""
    names = set(volumes) | mounts.volumes()
    users = await store.users(names)
    records = {}
    for name in sorted(names):
        ids = mounts.ids(name)
        described = tuple(user.describe() for user in users.get(name, []))
        if ids or described:
            records[name] = MountRecord(volume=name, node=node, ids=ids, users=described)
    return records
