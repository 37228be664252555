"""What happened to which volume, written by whoever did it: ``ferryctl events`` reads it back.

Retention is etcd's: each event is put on a lease of RETENTION_SECONDS that
nobody keeps alive, so etcd deletes it by itself (nothing has to prune, and
a writer that died leaves nothing behind for ever). A writer takes a new
lease every LEASE_SHARE_SECONDS and puts every event of that span on it: an
event lives between RETENTION_SECONDS and that plus LEASE_SHARE_SECONDS, at
one lease per writer per span, not one per event.

Recording is best effort: an event that cannot be written (etcd away) is
logged, and the thing it records goes on; events are the operator's
history, not state anyone acts on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aetcd

from ferry.cluster.keyspace import Keyspace
from ferry.core.records import Event, EventKind

log = logging.getLogger(__name__)

RETENTION_SECONDS = 7 * 86400
LEASE_SHARE_SECONDS = 3600.0
CONTROL_WRITER = "control"


class EventLog:
    """Records events as ``writer`` (a node's name, or ``control``)."""

    def __init__(
        self,
        keyspace: Keyspace,
        writer: str,
        retention: int = RETENTION_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyspace = keyspace
        self._writer = writer
        self._retention = retention
        self._clock = clock
        self._lease: aetcd.Lease | None = None
        self._lease_since = 0.0

    async def record(
        self, volume: str, kind: EventKind, detail: str = "", pause_seconds: float = 0.0
    ) -> None:
        event = Event(
            volume=volume, kind=kind, by=self._writer, detail=detail, pause_seconds=pause_seconds
        )
        try:
            await self._keyspace.put_event(self._writer, event, await self._current_lease())
        except Exception as error:
            self._lease = None  # perhaps expired or revoked: the next event takes a new one
            log.warning(
                "event not recorded: volume=%s kind=%s detail=%s error=%s",
                volume,
                kind.value,
                detail,
                error,
            )

    async def _current_lease(self) -> aetcd.Lease:
        now = self._clock()
        share = min(LEASE_SHARE_SECONDS, self._retention / 2)
        if self._lease is None or now - self._lease_since >= share:
            self._lease = await self._keyspace.new_lease(self._retention)
            self._lease_since = now
        return self._lease
