"""Benchmark: transfers through two agents vs raw ``zfs send | zfs recv``, and the handoff pause.

Not a pass/fail test. Run as root::

    /opt/ferry/venv/bin/python -m tests.bench.bench_transfer [--mib 1024] [--runs 3]

On a two-host local cluster (zfs-fuse pools on sparse files, TLS between
agents), it alternates, in one run:

- a raw ``zfs send | zfs receive`` of a volume between the two hosts' pools,
  and the same volume moved by the agents, taking turns at going first (the
  transfer time is what the source agent logs for the full stream: the TLS
  call, its ticket, the data connection and the receiver's checks after it; and
  what the receiver logs for the data connection alone); once with the agents as they
  start by default (encrypted streams) and once restarted with
  ``--insecure-plain-streams``, the two also taking turns at going first;
- the handoff pause (mount released on A until the copy on B is writable)
  of a small and a large volume, each with 16 MiB written after pre-copy.

It prints medians and their ratios.
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import subprocess
import time
from pathlib import Path

from tests.support.cluster import Cluster, ClusterHost, local_cluster
from tests.support.volumes import mount_held, mountpoint, wait_for, write_random_on

MIB = 1 << 20
PLAIN = {"FERRY_INSECURE_PLAIN_STREAMS": "1"}
SENT = re.compile(r"sent: volume=(\S+) to=\S+ snapshot=(\S+) bytes=(\d+) seconds=([\d.]+)")
RECEIVED = re.compile(r"received: volume=(\S+) snapshot=(\S+) bytes=(\d+) stream_seconds=([\d.]+)")


def fresh_volume(cluster: Cluster, host: ClusterHost, mib: int) -> str:
    name = f"bench-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", f"{mib + 256}M", "--node", host.name])
    wait_for(f"{name} on {host.name}", lambda: cluster.volume(name)["owner"] == host.name)
    write_random_on(cluster, host, f"{mountpoint(host, name)}/data", mib)
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
) -> tuple[float, float, float]:
    """Seconds of the full stream: the whole call as the source agent logged it (the TLS
    call, its ticket, the data connection, the receiver's checks after it), the data
    connection alone as the receiver logged it (first byte in to ``zfs receive``'s exit);
    and the seconds of the whole move."""
    started = time.monotonic()
    cluster.ferryctl(["volume", "move", name, b.name, "--wait", "--timeout", "600"])
    whole = time.monotonic() - started
    sent = [m for m in SENT.finditer(Path(a.logs["agent"] or "").read_text()) if m[1] == name]
    got = [m for m in RECEIVED.finditer(Path(b.logs["agent"] or "").read_text()) if m[1] == name]
    call = max(sent, key=lambda m: int(m[3]))
    stream = max(got, key=lambda m: int(m[3]))
    return float(call[4]), float(stream[4]), whole


def restart_agents(cluster: Cluster, env: dict[str, str]) -> None:
    """Both agents again, with ``env`` added (e.g. FERRY_INSECURE_PLAIN_STREAMS)."""
    for host in cluster.hosts[:2]:
        cluster.agent(host.name, "stop")
        cluster.agent(host.name, "start", env)


def handoff_pause(cluster: Cluster, name: str, a: ClusterHost, b: ClusterHost) -> float:
    """Seconds from releasing the mount on A (a container's, held in its own mount namespace)
    to the copy on B being mounted writable."""
    with mount_held(cluster, name, a.name):
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for("pre-copy", lambda: phase(cluster, name) == "waiting_for_unmount", 600)
        write_random_on(cluster, a, f"{mountpoint(a, name)}/changed", 16)
        time.sleep(4)  # let pre-copy catch up with the 16 MiB, as it does in use
        released = time.monotonic()
    dataset = f"{b.pool}/ferry/{name}"
    while True:
        props = cluster.run(
            b, ["zfs", "get", "-H", "-o", "value", "readonly,mounted", dataset], check=False
        ).stdout.split()
        if props == ["off", "yes"] and cluster.volume(name)["owner"] == b.name:
            return time.monotonic() - released
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="volume size for throughput")
    parser.add_argument("--small-mib", type=int, default=64)
    parser.add_argument("--large-mib", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--name", default=f"bn{secrets.token_hex(2)}", help="the local cluster's name"
    )
    parser.add_argument(
        "--pauses",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the handoff pause",
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
    with local_cluster(args.name, hosts=2, pool_size="16G") as cluster:
        a, b = cluster.hosts[0], cluster.hosts[1]
        raw: list[float] = []
        timed: dict[str, list[float]] = {"encrypted": [], "plain": []}
        streamed: dict[str, list[float]] = {"encrypted": [], "plain": []}
        whole: list[float] = []
        for run in range(args.runs):
            # Alternate which mode goes first, and within each mode raw or agents first,
            # so that neither always meets a warmer pool.
            modes = ["encrypted", "plain"] if run % 2 == 0 else ["plain", "encrypted"]
            line = f"run {run + 1}:"
            for index, mode in enumerate(modes):
                restart_agents(cluster, PLAIN if mode == "plain" else {})
                name = fresh_volume(cluster, a, args.mib)
                subprocess.run(["sync"], check=True)
                if (run + index) % 2:
                    transfer, stream, move = agent_transfer(cluster, name, a, b)
                    raw.append(raw_send_receive(cluster, name, a, b))
                else:
                    raw.append(raw_send_receive(cluster, name, a, b))
                    transfer, stream, move = agent_transfer(cluster, name, a, b)
                timed[mode].append(transfer)
                streamed[mode].append(stream)
                if mode == "encrypted":
                    whole.append(move)
                cluster.ferryctl(["volume", "delete", name, "--force"])
                line += f"  raw {raw[-1]:.2f}s  {mode} call {transfer:.2f}s stream {stream:.2f}s"
            print(line)
        restart_agents(cluster, {})
        raw_rate = args.mib / statistics.median(raw)
        for what, measured in (("data connection", streamed), ("whole call", timed)):
            rates = {mode: args.mib / statistics.median(s) for mode, s in measured.items()}
            print(
                f"throughput of {args.mib} MiB, medians of {args.runs} runs, {what}: raw "
                f"send|recv {raw_rate:.0f} MiB/s; agents encrypted {rates['encrypted']:.0f} "
                f"MiB/s, plain {rates['plain']:.0f} MiB/s; encrypted/raw "
                f"{rates['encrypted'] / raw_rate:.2f}, plain/raw {rates['plain'] / raw_rate:.2f}"
            )
        move_rate = args.mib / statistics.median(whole)
        print(f"whole encrypted move incl. handoff: {move_rate:.0f} MiB/s")
        if not args.pauses:
            return
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
