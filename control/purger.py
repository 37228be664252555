"""Control removes a deleted volume's records once no live node holds a copy of it.

A delete only marks the spec (``deleted``); every agent that holds a copy
destroys it and removes its ``state/<node>/<volume>`` record. When no state
record of the volume is left, control purges the spec, owner and move in one
transaction (``Keyspace.purge_volume``: only while the spec is still the
deleted one it read, so a new volume of the same name is never removed).
Control does it, not the last agent, so that no node needs the right to write
``volumes/`` (docs/control.md, "etcd users").

It scans when a spec or state record changes (a watch) and every
RESCAN_SECONDS besides. Several controls may run: the purge is a
compare-and-swap, and the second one finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.cluster.keyspace import Keyspace, Kind
from ferry.cluster.view import read_view

log = logging.getLogger(__name__)

RESCAN_SECONDS = 30.0
RETRY_SECONDS = 2.0


async def purge_settled(keyspace: Keyspace) -> list[str]:
    """Purge every deleted volume no live node reports holding; the names purged.

    Specs and state records come from one view (one etcd revision). A state
    record that does not decode counts as a copy: a purge must not take an
    unreadable record for none.
    """
    view = await read_view(keyspace, (Kind.VOLUMES, Kind.STATE))
    held = {state.volume for state in view.states}
    held |= {record.volume for record in view.skipped(Kind.STATE)}
    purged = []
    for name, spec in view.volumes.items():
        if spec.value.deleted and name not in held and await keyspace.purge_volume(name):
            log.info("volume purged, no copy is left: volume=%s", name)
            purged.append(name)
    return purged


async def purge_forever(keyspace: Keyspace) -> None:
    """Purge as copies go, until cancelled; etcd errors are logged and retried."""
    changed = asyncio.Event()
    watching = asyncio.create_task(_watch(keyspace, changed), name="purge-watch")
    try:
        while True:
            changed.clear()
            try:
                await purge_settled(keyspace)
            except Exception as error:
                log.warning("purge scan failed: error=%s retry_in=%.0fs", error, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), RESCAN_SECONDS)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def _watch(keyspace: Keyspace, changed: asyncio.Event) -> None:
    while True:
        try:
            async for _change in keyspace.watch(Kind.VOLUMES, Kind.STATE):
                changed.set()
        except Exception as error:
            log.warning("purge watch failed: error=%s retry_in=%.0fs", error, RETRY_SECONDS)
        await asyncio.sleep(RETRY_SECONDS)
        changed.set()
