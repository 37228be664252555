"""This node's record in etcd: claimed on a lease, kept alive, its free space kept current.

Two agents must never run under one node name: both would act for that
node's volumes. So registering claims ``nodes/<name>`` only while it is
absent. A record left by this host's previous run (the same pool, told by
its GUID) is taken over at once, as after a crash or a restart. A record
held by another pool is waited out for two lease TTLs, the time a dead
agent's lease needs to expire; if it is still there, another live agent
holds the name and this one stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import aetcd

from agent import metrics
from agent.retry import Backoff
from agent.store import VolumeStore
from ferry.cluster.keyspace import Keyspace
from ferry.core.fencing import FencingTiming
from ferry.core.records import NODE_READY, NodeInfo, NodeSeen

log = logging.getLogger(__name__)

# The record is rewritten when the pool's free space moved by this much, so
# placement and the size check see it, without a write for every block.
FREE_SPACE_STEP = 1 << 20
CLAIM_POLL_SECONDS = 0.5


class NodeNameTaken(Exception):
    """Another live agent, with another pool, is registered under this node name."""


class NodeNotAuthorized(Exception):
    """etcd refused this node's record: its certificate names no etcd user with that right."""


class Registration:
    """This node's lease, which every key it writes for itself (state, mounts) is put on."""

    def __init__(
        self,
        keyspace: Keyspace,
        record: NodeInfo,
        ttl: int,
        store: VolumeStore,
        cert_not_after: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """``record`` names the node; its free space and pool GUID are read from ``store``, its
        certificate's expiry from ``cert_not_after`` (which sees renewals)."""
        self._keyspace = keyspace
        self._cert_not_after = cert_not_after
        self._record = record
        self._ttl = ttl
        self._store = store
        self._lease: aetcd.Lease | None = None
        self.renewed_at = -float("inf")
        """When (time.monotonic) the last renewal etcd confirmed was sent: the lease cannot
        expire before ``renewed_at + ttl`` (``agent.selffence`` reads it)."""
        self.registrations = 0
        """How many times this agent registered: a new lease each time."""

    @property
    def lease(self) -> aetcd.Lease:
        if self._lease is None:
            raise RuntimeError(f"node {self._record.name} is not registered yet")
        return self._lease

    async def register(self) -> None:
        """Claim the node record on a new lease; NodeNameTaken if another agent keeps it."""
        record = replace(
            self._record,
            free_bytes=await self._store.free_bytes(),
            pool_guid=await self._store.pool_guid(),
            started_at=time.time(),
            cert_not_after=await asyncio.to_thread(self._cert_not_after),
        )
        granted = time.monotonic()
        lease = await self._keyspace.new_lease(self._ttl)
        # etcd raises a TTL below its minimum; the holder's lease got the same.
        deadline = time.monotonic() + 2 * int(await lease.granted_ttl())
        waiting = False
        while (holder := await self._claim(record, lease)) is not None:
            if holder.pool_guid == record.pool_guid:
                await self._keyspace.update_node(record, lease)
                log.info("took over this host's earlier record: node=%s", record.name)
                break
            if time.monotonic() > deadline:
                await lease.revoke()
                raise NodeNameTaken(
                    f"node name {record.name} is held by another live agent (address "
                    f"{holder.address}, pool {holder.pool}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.started_at))}); "
                    f"stop that agent or start this one with another --node"
                )
            if not waiting:
                log.warning(
                    "node name held by another pool, waiting for its lease to expire: node=%s "
                    "holder_address=%s",
                    record.name,
                    holder.address,
                )
                waiting = True
            await asyncio.sleep(CLAIM_POLL_SECONDS)
            sent = time.monotonic()
            if await self._keyspace.refresh_lease(lease) > 0:
                granted = sent
        self._record, self._lease = record, lease
        self.renewed_at = granted
        self.registrations += 1
        await self._seen()
        log.info("registered: node=%s address=%s", record.name, record.address)

    async def mark_ready(self) -> None:
        """Say on record that this agent serves now: recovery done, gRPC and plugin answering.

        Until then the record says ``starting`` (``ferryctl node list`` shows it), so a node
        that registered and then hangs in its start-up is never taken for a live one.
        """
        self._record = replace(self._record, status=NODE_READY)
        await self._keyspace.update_node(self._record, self.lease)
        log.info("node ready: node=%s", self._record.name)

    async def _claim(self, record: NodeInfo, lease: aetcd.Lease) -> NodeInfo | None:
        try:
            return await self._keyspace.claim_node(record, lease)
        except aetcd.ClientError as error:
            if "permission denied" not in str(error):
                raise
            await lease.revoke()
            raise NodeNotAuthorized(
                f"etcd refused the record of node {record.name} ({error}): the node's "
                f"certificate must be named {record.name} and the node must have its etcd "
                f"user; run ferry-etcd-bootstrap --node {record.name} (with every other "
                "node's --node too; docs/deploy.md) and start the agent again"
            ) from error

    async def keep_alive(self, registered_again: Callable[[], None]) -> None:
        """Refresh the lease and the free space on record until cancelled; register again when
        the lease was lost (etcd down too long), then call ``registered_again``."""
        timing = FencingTiming(self._ttl)
        interval = timing.renew_interval
        # Retried soon after a failure, and each attempt bounded: a renewal hung on a cut
        # link must not hold the next one back past the self-fence (agent.selffence).
        backoff = Backoff(first=timing.renew_retry / 2, cap=timing.renew_retry)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            try:
                sent = time.monotonic()
                async with asyncio.timeout(timing.renew_timeout):
                    remaining = await self._keyspace.refresh_lease(self.lease)
                if remaining <= 0:
                    metrics.LEASE_RENEW_FAILURES.labels("expired").inc()
                    await self.register()
                    registered_again()
                else:
                    self.renewed_at = sent
                    await self._seen()
                    await self._report_changes()
                backoff.reset()
            except NodeNameTaken:
                raise
            except Exception as error:
                metrics.LEASE_RENEW_FAILURES.labels("error").inc()
                delay = backoff.next()
                log.warning(
                    "etcd lease refresh failed: error=%s retry_in=%.1fs",
                    str(error) or type(error).__name__,
                    delay,
                )

    async def _seen(self) -> None:
        """Put on record that this node is live now (``seen/<node>``, kept after its lease):
        a failover says from it how long the lost owner ran after the promoted snapshot.

        Written at each registration as well as each renewal: written at renewals only,
        the record was missing for a node lost before its first renewal, and a node that
        registered again after losing its lease (a partition) was on record as last seen
        before the partition, older than any snapshot taken since, until its next renewal.
        """
        await self._keyspace.put_seen(NodeSeen(self._record.name, time.time()))

    async def _report_changes(self) -> None:
        """Free space that moved by a step, and a renewed certificate's expiry."""
        free = await self._store.free_bytes()
        expiry = await asyncio.to_thread(self._cert_not_after)
        record = self._record
        if abs(free - record.free_bytes) >= FREE_SPACE_STEP:
            record = replace(record, free_bytes=free)
        if expiry != record.cert_not_after:
            record = replace(record, cert_not_after=expiry)
        if record != self._record:
            self._record = record
            await self._keyspace.update_node(record, self.lease)
            log.debug(
                "node record updated: node=%s free_bytes=%d cert_not_after=%.0f",
                record.name,
                free,
                expiry,
            )
