"""Control-plane benchmark: volume creates and lists through the gRPC API, and watch latency.

Runs a real etcd and a real ``ferry-control`` (mutual TLS) per size, so the
100-volume and 1,000-volume runs start from the same empty state. Prints
the cost per create and per listed volume, the growth ratio from 100 to
1,000, how long a WatchVolume watcher takes to see a MoveVolume, and
``ferryctl apply`` of one file of volumes made one at a time against the
default ``--parallelism``, side by side on one control plane.

    /opt/ferry/venv/bin/python -m tests.bench.bench_control
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import yaml

from ferry.cluster.keyspace import Keyspace
from ferry.core.records import MovePhase, Owner
from protos.ferry.v1 import control_pb2, control_pb2_grpc
from tests.support.etcd import ControlServer, EtcdServer, LiveNodes, ferryctl, issue_certificates

SIZES = (100, 1000)
APPLIED = 200
APPLY_PARALLELISM = (1, 16)
LIST_RUNS = 5
WATCH_SAMPLES = 20
ROOMY = 1 << 50


@dataclass(frozen=True)
class ScaleResult:
    volumes: int
    create_ms: float
    list_ms: float

    @property
    def list_per_volume_ms(self) -> float:
        return self.list_ms / self.volumes


def _stub(control: ControlServer) -> tuple[grpc.aio.Channel, control_pb2_grpc.ControlStub]:
    channel = grpc.aio.secure_channel(
        control.address,
        control.certs.admin.channel_credentials(),
        options=[("grpc.ssl_target_name_override", "control")],
    )
    return channel, control_pb2_grpc.ControlStub(channel)


async def _scale(control: ControlServer, keyspace: Keyspace, count: int) -> ScaleResult:
    nodes = LiveNodes(keyspace)
    await nodes.add("bench-a", ROOMY, ttl=600)
    channel, stub = _stub(control)
    try:
        started = time.perf_counter()
        for i in range(count):
            await stub.CreateVolume(
                control_pb2.CreateVolumeRequest(name=f"bench-{i:05d}", size="1M"), timeout=30
            )
        create_ms = (time.perf_counter() - started) * 1000 / count
        list_times = []
        for _ in range(LIST_RUNS):
            started = time.perf_counter()
            reply = await stub.ListVolumes(control_pb2.ListVolumesRequest(), timeout=120)
            list_times.append((time.perf_counter() - started) * 1000)
            assert len(reply.volumes) == count, f"listed {len(reply.volumes)} of {count}"
        return ScaleResult(count, create_ms, statistics.median(list_times))
    finally:
        await channel.close(None)
        await nodes.revoke_all()


async def _watch_latency(control: ControlServer, keyspace: Keyspace) -> list[float]:
    """Milliseconds from a MoveVolume call to a WatchVolume watcher seeing the new placement.

    Between samples the move is completed the way the agents would record it
    (owner transferred at the next epoch, move marked done), untimed.
    """
    nodes = LiveNodes(keyspace)
    await nodes.add("bench-a", ROOMY, ttl=600)
    await nodes.add("bench-b", ROOMY, ttl=600)
    channel, stub = _stub(control)
    name = "bench-watched"
    await stub.CreateVolume(
        control_pb2.CreateVolumeRequest(name=name, size="1M", node="bench-a"), timeout=30
    )
    assert await keyspace.claim_owner(name, "bench-a")
    seen: asyncio.Queue[tuple[float, control_pb2.Volume]] = asyncio.Queue()

    async def follow() -> None:
        async for volume in stub.WatchVolume(control_pb2.GetVolumeRequest(name=name)):
            await seen.put((time.perf_counter(), volume))

    watcher = asyncio.create_task(follow())
    latencies = []
    try:
        await seen.get()
        here, there = "bench-a", "bench-b"
        for _ in range(WATCH_SAMPLES):
            started = time.perf_counter()
            await stub.MoveVolume(control_pb2.MoveVolumeRequest(name=name, node=there), timeout=30)
            while True:
                at, volume = await asyncio.wait_for(seen.get(), 30)
                if volume.node == there:
                    latencies.append((at - started) * 1000)
                    break
            await _complete_move(keyspace, name, Owner(here, volume.epoch), there)
            here, there = there, here
    finally:
        watcher.cancel()
        await channel.close(None)
        await nodes.revoke_all()
    return latencies


async def _apply_seconds(control: ControlServer, keyspace: Keyspace, work: Path) -> list[float]:
    """Seconds for ``ferryctl apply`` of APPLIED new volumes at each APPLY_PARALLELISM."""
    nodes = LiveNodes(keyspace)
    await nodes.add("bench-a", ROOMY, ttl=600)
    env = control.ferryctl_env()
    seconds = []
    try:
        for parallelism in APPLY_PARALLELISM:
            names = [{"name": f"apply{parallelism}-{i:04d}", "size": "1M"} for i in range(APPLIED)]
            file = work / f"apply-{parallelism}.yaml"
            file.write_text(yaml.safe_dump({"volumes": names}))
            started = time.perf_counter()
            result = await ferryctl(
                env, "apply", "-f", str(file), "--parallelism", str(parallelism)
            )
            seconds.append(time.perf_counter() - started)
            assert result.code == 0, result.stderr
    finally:
        await nodes.revoke_all()
    return seconds


async def _complete_move(keyspace: Keyspace, name: str, owner: Owner, target: str) -> None:
    assert await keyspace.transfer_owner(name, owner, target)
    move = await keyspace.get_move(name)
    assert move is not None
    assert await keyspace.put_move(replace(move.value, phase=MovePhase.DONE), move.revision)


async def _with_control_plane(
    work: Path, count: int | None, applying: bool = False
) -> ScaleResult | list[float]:
    certs = issue_certificates(work / f"ca-{count}")
    with (
        EtcdServer("ctbench", certs=certs) as etcd,
        ControlServer(etcd.endpoint, certs, work) as control,
    ):
        client = etcd.client()
        try:
            keyspace = Keyspace(client)
            if applying:
                return await _apply_seconds(control, keyspace, work)
            if count is None:
                return await _watch_latency(control, keyspace)
            return await _scale(control, keyspace, count)
        finally:
            await client.close()


async def _main() -> None:
    with tempfile.TemporaryDirectory(prefix="ctbench-") as tmp:
        work = Path(tmp)
        results = []
        for count in SIZES:
            result = await _with_control_plane(work, count)
            assert isinstance(result, ScaleResult)
            results.append(result)
            print(
                f"{result.volumes:>5} volumes: create {result.create_ms:.2f} ms/op, "
                f"list {result.list_ms:.1f} ms ({result.list_per_volume_ms:.3f} ms/volume)"
            )
        small, large = results
        print(
            f"growth {large.volumes}/{small.volumes}: create per op x"
            f"{large.create_ms / small.create_ms:.2f}, list total x"
            f"{large.list_ms / small.list_ms:.2f}, list per volume x"
            f"{large.list_per_volume_ms / small.list_per_volume_ms:.2f}"
        )
        latencies = await _with_control_plane(work, None)
        assert isinstance(latencies, list)
        print(
            f"MoveVolume -> WatchVolume sees it: median {statistics.median(latencies):.1f} ms, "
            f"min {min(latencies):.1f}, max {max(latencies):.1f} (n={len(latencies)})"
        )
        applied = await _with_control_plane(work, None, applying=True)
        assert isinstance(applied, list)
        one, parallel = applied
        print(
            f"apply of {APPLIED} volumes: one at a time {one:.1f} s, --parallelism "
            f"{APPLY_PARALLELISM[1]} {parallel:.1f} s (x{parallel / one:.2f})"
        )


if __name__ == "__main__":
    asyncio.run(_main())
