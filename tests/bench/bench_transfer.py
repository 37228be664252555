"""Benchmark: transfers through two agents vs raw ``zfs send | zfs recv``, and the handoff pause.

Not a pass/fail test. Run as root::

    /opt/ferry/venv/bin/python -m tests.bench.bench_transfer [--mib 1024] [--runs 3]

On a two-host local cluster (zfs-fuse pools on sparse files, TLS between
agents), it alternates, in one run:

- a raw ``zfs send | zfs receive`` of a volume between the two hosts' pools,
  and the same volume moved by the agents, taking turns at going first (the
  transfer time is what the source agent logs for the full stream: the TLS
  call, its ticket, and the data connection); then the same with both
  agents restarted with ``--encrypt-streams``;
- the handoff pause (mount released on A until the copy on B is writable)
  of a small and a large volume, each with 16 MiB written after pre-copy.

It prints medians and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import statistics
import subprocess
import time
from pathlib import Path

from control.keyspace import Keyspace
from control.records import MountRecord
from tests.cluster.test_moves import mountpoint, wait_for, write_random
from tests.support.cluster import Cluster, ClusterHost, local_cluster

MIB = 1 << 20
SENT = re.compile(r"sent: volume=(\S+) to=\S+ snapshot=(\S+) bytes=(\d+) seconds=([\d.]+)")


def fresh_volume(cluster: Cluster, host: ClusterHost, mib: int) -> str:
    name = f"bench-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", f"{mib + 256}M", "--node", host.name])
    wait_for(f"{name} on {host.name}", lambda: cluster.volume(name)["owner"] == host.name)
    write_random(cluster, host, f"{mountpoint(host, name)}/data", mib)
    return name


def phase(cluster: Cluster, name: str) -> str:
    move = cluster.volume(name).get("move") or {}
    assert isinstance(move, dict)
    return str(move.get("phase", ""))


def raw_send_receive(cluster: Cluster, name: str, a: ClusterHost, b: ClusterHost) -> float:
    """Seconds for ``zfs send | zfs receive`` of the volume between the hosts' pools."""
    snap = f"{a.pool}/ferry/{name}@raw"
    target = f"{b.pool}/bench-raw-{name}"
    subprocess.run(["zfs", "snapshot", snap], check=True)
    started = time.monotonic()
    subprocess.run(
        f"zfs send {snap} | zfs receive -u {target}@raw", shell=True, check=True, timeout=600
    )
    elapsed = time.monotonic() - started
    subprocess.run(["zfs", "destroy", "-r", target], check=True)
    subprocess.run(["zfs", "destroy", snap], check=True)
    return elapsed


def agent_transfer(
    cluster: Cluster, name: str, a: ClusterHost, b: ClusterHost
) -> tuple[float, float]:
    """(seconds of the full stream as the source agent logged it, seconds of the whole move)."""
    started = time.monotonic()
    cluster.ferryctl(["volume", "move", name, b.name, "--wait", "--timeout", "600"])
    whole = time.monotonic() - started
    log = Path(a.logs["agent"] or "").read_text()
    full = [m for m in SENT.finditer(log) if m.group(1) == name]
    return float(max(full, key=lambda m: int(m.group(3))).group(4)), whole


def restart_agents(cluster: Cluster, env: dict[str, str]) -> None:
    """Both agents again, with ``env`` added (e.g. FERRY_ENCRYPT_STREAMS)."""
    for host in cluster.hosts[:2]:
        cluster.agent(host.name, "stop")
        cluster.agent(host.name, "start", env)


def handoff_pause(cluster: Cluster, name: str, a: ClusterHost, b: ClusterHost) -> float:
    """Seconds from releasing the mount on A to the copy on B being mounted writable."""

    async def scenario() -> float:
        client = cluster.etcd_client()
        keyspace = Keyspace(client)
        try:
            lease = await client.lease(120)
            await keyspace.put_mount(MountRecord(volume=name, node=a.name, ids=("bench",)), lease)
            cluster.ferryctl(["volume", "move", name, b.name])
            await asyncio.to_thread(
                wait_for,
                "pre-copy",
                lambda: phase(cluster, name) == "waiting_for_unmount",
                600,
            )
            write_random(cluster, a, f"{mountpoint(a, name)}/changed", 16)
            await asyncio.sleep(4)  # let pre-copy catch up with the 16 MiB, as it does in use
            released = time.monotonic()
            await keyspace.delete_mount(name, a.name)
            dataset = f"{b.pool}/ferry/{name}"
            while True:
                props = cluster.run(
                    b, ["zfs", "get", "-H", "-o", "value", "readonly,mounted", dataset], check=False
                ).stdout.split()
                owner = await keyspace.get_owner(name)
                if props == ["off", "yes"] and owner is not None and owner.value.node == b.name:
                    return time.monotonic() - released
                await asyncio.sleep(0.05)
        finally:
            await client.close()

    return asyncio.run(scenario())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="volume size for throughput")
    parser.add_argument("--small-mib", type=int, default=64)
    parser.add_argument("--large-mib", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--encrypted",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time transfers with --encrypt-streams",
    )
    args = parser.parse_args()
    settings = Path("/etc/zfs/zfsrc")
    print(
        "zfsrc:",
        " ".join(
            line for line in settings.read_text().splitlines() if line and not line.startswith("#")
        )
        if settings.exists()
        else "(none)",
    )
    with local_cluster(f"bn{secrets.token_hex(2)}", hosts=2, pool_size="16G") as cluster:
        a, b = cluster.hosts[0], cluster.hosts[1]
        raw, agent, whole, encrypted = [], [], [], []
        for run in range(args.runs):
            name = fresh_volume(cluster, a, args.mib)
            subprocess.run(["sync"], check=True)
            if run % 2:  # alternate which goes first, so neither always meets a warmer pool
                transfer, move = agent_transfer(cluster, name, a, b)
                raw.append(raw_send_receive(cluster, name, a, b))
            else:
                raw.append(raw_send_receive(cluster, name, a, b))
                transfer, move = agent_transfer(cluster, name, a, b)
            agent.append(transfer)
            whole.append(move)
            cluster.ferryctl(["volume", "delete", name, "--force"])
            line = f"run {run + 1}: raw {raw[-1]:.2f}s  agents {agent[-1]:.2f}s"
            if args.encrypted:
                restart_agents(cluster, {"FERRY_ENCRYPT_STREAMS": "1"})
                name = fresh_volume(cluster, a, args.mib)
                subprocess.run(["sync"], check=True)
                encrypted.append(agent_transfer(cluster, name, a, b)[0])
                cluster.ferryctl(["volume", "delete", name, "--force"])
                restart_agents(cluster, {})
                line += f"  agents encrypted {encrypted[-1]:.2f}s"
            print(f"{line}  whole move {move:.2f}s")
        raw_rate = args.mib / statistics.median(raw)
        agent_rate = args.mib / statistics.median(agent)
        print(
            f"throughput of {args.mib} MiB: raw send|recv {raw_rate:.0f} MiB/s, through two agents "
            f"{agent_rate:.0f} MiB/s, ratio {agent_rate / raw_rate:.2f} "
            f"(whole move incl. handoff: {args.mib / statistics.median(whole):.0f} MiB/s)"
        )
        if encrypted:
            rate = args.mib / statistics.median(encrypted)
            print(
                f"with --encrypt-streams: {rate:.0f} MiB/s, ratio to raw {rate / raw_rate:.2f}, "
                f"to plain agents {rate / agent_rate:.2f}"
            )
        pauses: dict[int, list[float]] = {args.small_mib: [], args.large_mib: []}
        for run in range(args.runs):
            for mib in pauses:
                name = fresh_volume(cluster, a, mib)
                pauses[mib].append(handoff_pause(cluster, name, a, b))
                cluster.ferryctl(["volume", "delete", name, "--force"])
                print(
                    f"run {run + 1}: {mib} MiB volume, 16 MiB changed: pause {pauses[mib][-1]:.2f}s"
                )
        small = statistics.median(pauses[args.small_mib])
        large = statistics.median(pauses[args.large_mib])
        print(
            f"handoff pause, 16 MiB changed after pre-copy: "
            f"{args.small_mib} MiB volume {small:.2f}s, "
            f"{args.large_mib} MiB volume {large:.2f}s, ratio {large / small:.2f}"
        )


if __name__ == "__main__":
    main()
