"""The command line of ``deploy/local-cluster`` (usage in docs/local-cluster.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ferry.core.records import parse_size
from ferry.localcluster.cluster import (
    UpOptions,
    down,
    format_status,
    load_image,
    process_action,
    refuse_existing,
    status,
    up,
)
from ferry.localcluster.commands import ClusterError
from ferry.localcluster.layout import (
    DEFAULT_NAME,
    SWARM_HOST_LABEL,
    default_state_dir,
    validate_name,
)

log = logging.getLogger("local-cluster")


DESCRIPTION = (
    "Ferry hosts on one machine: network namespaces on a bridge, each with its own\n"
    "ZFS pool (a sparse file), agent, certificates and optionally its own dockerd;\n"
    "etcd and ferry-control run beside them in the root namespace."
)


def pool_size(text: str) -> int:
    """--pool-size in Ferry's one size grammar (``ferry.core.records.parse_size``)."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}, e.g. 4G") from error


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="local-cluster", description=DESCRIPTION)
    top.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    commands = top.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--name",
            default=DEFAULT_NAME,
            type=validate_name,
            help=f"cluster name (default {DEFAULT_NAME})",
        )
        sub.add_argument(
            "--state-dir", type=Path, help="state directory (default /run/ferry-cluster/NAME)"
        )

    up_cmd = commands.add_parser("up", help="create the hosts and start everything")
    common(up_cmd)
    up_cmd.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up_cmd.add_argument("--docker", action="store_true", help="also run a dockerd per host")
    up_cmd.add_argument(
        "--swarm", action="store_true",
        help="--docker, and the dockerds form a Docker Swarm (host1 manager, nodes labelled "
        f"{SWARM_HOST_LABEL}=HOST)",
    )  # fmt: skip
    up_cmd.add_argument(
        "--insecure", action="store_true", help="no TLS between Ferry processes (development only)"
    )
    up_cmd.add_argument(
        "--no-agents", dest="agents", action="store_false",
        help="hosts, pools, etcd (and dockerd) only: no certificates, ferry-control or ferry-agent",
    )  # fmt: skip
    up_cmd.add_argument(
        "--ferry-bin", type=Path,
        help="directory holding ferry-agent, ferry-control and ferryctl (default: the venv, PATH)",
    )  # fmt: skip
    up_cmd.add_argument(
        "--pool-size",
        type=pool_size,
        default=pool_size("4G"),
        help="sparse pool file size (default 4G)",
    )
    down_cmd = commands.add_parser("down", help="stop everything and delete every trace")
    common(down_cmd)
    status_cmd = commands.add_parser("status", help="what runs and what is missing")
    common(status_cmd)
    status_cmd.add_argument("-o", "--output", choices=("text", "json"), default="text")
    process_cmd = commands.add_parser(
        "process", help="kill, stop or start etcd, control, agent:HOST or docker:HOST"
    )
    common(process_cmd)
    process_cmd.add_argument("role", help="etcd, control, agent:HOST or docker:HOST")
    process_cmd.add_argument("action", choices=("kill", "stop", "start"))
    load_cmd = commands.add_parser(
        "load-image", help="docker load a saved image tarball into every host's dockerd"
    )
    common(load_cmd)
    load_cmd.add_argument("file", type=Path)
    return top


@contextlib.contextmanager
def cleanup_on_failure(name: str, state_dir: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        log.error("up failed for cluster=%s; cleaning up what was created", name)
        try:
            down(name, state_dir)
        except ClusterError as exc:
            log.error("cleanup after failed up was incomplete: %s", exc)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="local-cluster %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    state_dir: Path = args.state_dir or default_state_dir(args.name)
    try:
        if args.command == "up":
            refuse_existing(args.name, state_dir)
            with cleanup_on_failure(args.name, state_dir):
                options = UpOptions(
                    hosts=args.hosts,
                    docker=args.docker,
                    insecure=args.insecure,
                    agents=args.agents,
                    pool_size=args.pool_size,
                    ferry_bin=args.ferry_bin,
                    swarm=args.swarm,
                )
                layout = up(args.name, state_dir, options)
            print(layout.description_file)
        elif args.command == "down":
            down(args.name, state_dir)
        elif args.command == "status":
            report = status(args.name, state_dir)
            print(json.dumps(report, indent=2) if args.output == "json" else format_status(report))
            return 0 if report["healthy"] else 1
        elif args.command == "load-image":
            load_image(args.name, state_dir, args.file)
        elif args.command == "process":
            process_action(args.name, state_dir, args.role, args.action)
    except ClusterError as exc:
        log.error("%s", exc)
        return 1
    return 0
