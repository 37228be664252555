"""Cluster-view benchmark: etcd requests and time of a convergence pass, GetVolume and
ListVolumes, read as one view against one read per kind (the shape they had before).

One real etcd (mutual TLS) holding 1,000 volumes placed on three other nodes,
each with its owner, state and mount records and one move in ten; one agent
on an empty scratch pool (it holds none of them, so its pass is the read and
the plan) and one in-process ferry-control. Each path runs as it is, then with
``read_view`` replaced by one read per kind, and the ratios are printed.

    /opt/ferry/venv/bin/python -m tests.bench.bench_view
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import agent.asides
import agent.service
import control.server
from ferry.cluster.keyspace import Keyspace, Kind
from ferry.cluster.view import ClusterView, read_view
from ferry.core.records import MountRecord, Move, NodeState, VolumeSpec
from protos.ferry.v1 import control_pb2
from tests.support.etcd import EtcdServer, LiveNodes
from tests.support.etcd_requests import KvRecorder
from tests.support.inprocess import insecure_control, registered_agent
from tests.support.pools import scratch_pool

VOLUMES = 1000
OTHERS = ("bench-a", "bench-b", "bench-c")
NODE = "bench-me"
PASSES = 20
GETS = 50
LISTS = 5
ROOMY = 1 << 50
Reader = Callable[..., Awaitable[ClusterView]]


async def read_per_kind(
    keyspace: Keyspace, kinds: Iterable[Kind] = tuple(Kind), volume: str = "", node: str = ""
) -> ClusterView:
    """``read_view`` as the callers read before it: one etcd request per kind."""
    views = [await read_view(keyspace, (kind,), volume, node) for kind in dict.fromkeys(kinds)]
    return ClusterView(
        revision=views[-1].revision,
        volumes={k: v for view in views for k, v in view.volumes.items()},
        owners={k: v for view in views for k, v in view.owners.items()},
        moves={k: v for view in views for k, v in view.moves.items()},
        nodes={k: v for view in views for k, v in view.nodes.items()},
        states=tuple(s for view in views for s in view.states),
        mounts=tuple(m for view in views for m in view.mounts),
        asides=tuple(a for view in views for a in view.asides),
        drops=tuple(d for view in views for d in view.drops),
        unreadable=tuple(u for view in views for u in view.unreadable),
    )


@contextlib.contextmanager
def reading_with(reader: Reader) -> Iterator[None]:
    """Every caller of ``read_view`` (convergence, the ledger, control) uses ``reader``."""
    modules = (agent.service, agent.asides, control.server)
    saved = [module.read_view for module in modules]
    for module in modules:
        module.read_view = reader  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.read_view = original  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Cost:
    requests: float
    ms: float


async def _compare(
    requests: KvRecorder, runs: int, step: Callable[[], Awaitable[object]]
) -> tuple[Cost, Cost]:
    """``step`` read per kind and as one view, in turns (which goes first alternates, so
    neither always follows the other's garbage): medians and requests per run."""
    times: dict[bool, list[float]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    for run in range(runs):
        for as_view in (False, True) if run % 2 else (True, False):
            with contextlib.nullcontext() if as_view else reading_with(read_per_kind):
                requests.reset()
                started = time.perf_counter()
                await step()
                times[as_view].append((time.perf_counter() - started) * 1000)
                counts[as_view] += requests.total
    before, after = (Cost(counts[v] / runs, statistics.median(times[v])) for v in (False, True))
    return before, after


async def _populate(keyspace: Keyspace) -> None:
    nodes = LiveNodes(keyspace)
    for name in OTHERS:
        await nodes.add(name, ROOMY, ttl=600)
    lease = await keyspace.new_lease(600)
    for i in range(VOLUMES):
        name, node = f"bench-{i:05d}", OTHERS[i % len(OTHERS)]
        await keyspace.create_volume(VolumeSpec(name=name, size_bytes=1 << 30, node=node))
        assert await keyspace.claim_owner(name, node)
        snapshots = tuple(f"ferry-1-{n}" for n in range(5))
        await keyspace.put_state(NodeState(node=node, volume=name, snapshots=snapshots), lease)
        await keyspace.put_mount(MountRecord(volume=name, node=node, ids=("c1",)), lease)
        if i % 10 == 0:
            target = OTHERS[(i + 1) % len(OTHERS)]
            assert await keyspace.put_move(Move(volume=name, source=node, target=target), None)


def _report(what: str, before: Cost, after: Cost) -> None:
    print(
        f"{what:<13} requests {before.requests:>4.1f} -> {after.requests:>4.1f} "
        f"(x{after.requests / before.requests:.2f}); median {before.ms:7.1f} ms -> "
        f"{after.ms:7.1f} ms (x{after.ms / before.ms:.2f})"
    )


async def _main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="vwbench-") as tmp,
        EtcdServer("vwbench") as etcd,
        scratch_pool("vwbench") as pool,
    ):
        client = etcd.client()
        try:
            keyspace = Keyspace(client)
            await _populate(keyspace)
            requests = await KvRecorder(client).install()
            async with (
                registered_agent(NODE, pool.name, etcd.endpoint, keyspace, Path(tmp), 600) as (
                    service,
                    _,
                ),
                insecure_control(keyspace) as stub,
            ):
                name = f"bench-{VOLUMES // 2:05d}"

                async def get() -> None:
                    await stub.GetVolume(control_pb2.GetVolumeRequest(name=name), timeout=30)

                async def listing() -> None:
                    reply = await stub.ListVolumes(control_pb2.ListVolumesRequest(), timeout=120)
                    assert len(reply.volumes) == VOLUMES

                steps: list[tuple[str, int, Callable[[], Awaitable[object]]]] = [
                    ("pass", PASSES, service.converge),
                    ("GetVolume", GETS, get),
                    ("ListVolumes", LISTS, listing),
                ]
                print(f"{VOLUMES} volumes on {len(OTHERS)} nodes, one agent holding none")
                for what, runs, step in steps:
                    _report(what, *await _compare(requests, runs, step))
        finally:
            await client.close()


if __name__ == "__main__":
    asyncio.run(_main())
