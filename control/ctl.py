"""ferryctl: the command line of a Ferry cluster.

Settings come from flags, then ``FERRY_*`` environment variables, then the
config file (``--config``, default ``~/.config/ferry/ferryctl.yaml``, keys
``control``, ``tls_ca``, ``tls_cert``, ``tls_key``, ``insecure``). Every read
takes ``-o table|json|yaml``. Exit code 0 on success; otherwise one line on
stderr saying what failed.
"""

from __future__ import annotations

import os

# gRPC core prints its own handshake diagnostics on stderr unless told otherwise
# before it loads; ferryctl's one-line error says what failed.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import click
import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich import filesize
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from control import live
from ferry.core.declared import Change, Current, DeclarationError, Declared, changes, parse
from ferry.core.phases import ACTIVE_PHASES, ENDED_PHASES, MovePhase
from ferry.security import ca
from ferry.security.tls import TlsFiles
from protos.ferry.v1 import control_pb2, control_pb2_grpc

DEFAULT_CONFIG = Path("~/.config/ferry/ferryctl.yaml").expanduser()
SETTINGS = ("control", "tls_ca", "tls_cert", "tls_key", "insecure")
CONTROL_NAME = "control"
RECONNECT_SECONDS = 1.0
APPLY_PARALLELISM = 16
OUTPUT = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
# The declared-volumes file of `diff` and `apply`; the CA directory of the `ca` commands.
DECLARED_FILE = click.option("-f", "--file", "file", type=click.Path(path_type=Path), required=True)
CA_DIR = click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)

WATCH = click.option(
    "-w", "--watch", is_flag=True, help="Keep following: redraw on each change until Ctrl-C."
)
INTERVAL = click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="With --watch: seconds between reads of the list.",
)

console = Console()


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"ferryctl: {message}", err=True)
    sys.exit(code)


class Api:
    """A connection to ferry-control, made on first use."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._stub: control_pb2_grpc.ControlStub | None = None

    @property
    def stub(self) -> control_pb2_grpc.ControlStub:
        if self._stub is None:
            self._stub = control_pb2_grpc.ControlStub(self._channel())
        return self._stub

    def _channel(self) -> grpc.Channel:
        s = self._settings
        address = s.get("control")
        if not address:
            fail(
                "no control address: give --control, FERRY_CONTROL or 'control' in the config file"
            )
        if s.get("insecure"):
            return grpc.insecure_channel(address)
        if not (s.get("tls_ca") and s.get("tls_cert") and s.get("tls_key")):
            fail(
                "give --tls-ca, --tls-cert and --tls-key (or --insecure for a development cluster)"
            )
        tls = TlsFiles(Path(s["tls_ca"]), Path(s["tls_cert"]), Path(s["tls_key"]))
        try:
            credentials = tls.channel_credentials()
        except FileNotFoundError as error:
            fail(str(error))
        return grpc.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", CONTROL_NAME)]
        )

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            fail(_rpc_message(error))


def _rpc_message(error: grpc.RpcError) -> str:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith("ferry-control cannot reach etcd"):
            return details
        if "handshake failed" in details.lower():
            return (
                f"cannot reach ferry-control: the TLS handshake failed ({details}); is --tls-ca "
                f"the cluster's CA certificate, and control's certificate issued by it?"
            )
        if "socket closed" in details.lower():
            return (
                f"cannot reach ferry-control: it closed the connection ({details}); is it "
                f"running, and is --tls-cert issued by the cluster's CA (control drops a "
                f"client whose certificate it does not trust; 'ferryctl ca issue')?"
            )
        return f"cannot reach ferry-control: {details}; is it running and is the address right?"
    return f"{details} ({code.name.lower()})"


def _load_settings(config: Path | None, given: dict[str, Any]) -> dict[str, Any]:
    path = config or DEFAULT_CONFIG
    from_file: dict[str, Any] = {}
    if path.exists():
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            fail(f"config file {path} is not valid YAML: {error}")
        unknown = set(from_file) - set(SETTINGS)
        if unknown:
            fail(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    elif config is not None:
        fail(f"config file {path} does not exist")
    return {
        key: given[key] if given.get(key) not in (None, False) else from_file.get(key)
        for key in SETTINGS
    }


@click.group(
    context_settings={"auto_envvar_prefix": "FERRY", "help_option_names": ["-h", "--help"]}
)
@click.option("--control", default=None, help="ferry-control address HOST:PORT.")
@click.option("--tls-ca", default=None, help="Cluster CA certificate.")
@click.option("--tls-cert", default=None, help="Your certificate (ferryctl ca issue --kind user).")
@click.option("--tls-key", default=None, help="Your private key.")
@click.option("--insecure", is_flag=True, default=None, help="No TLS (development clusters).")
@click.option("--config", type=click.Path(path_type=Path), default=None, help="Config file.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, **given: Any) -> None:
    """Declare and inspect where Ferry volumes live."""
    ctx.obj = Api(_load_settings(config, given))


def _volume_dict(volume: control_pb2.Volume) -> dict[str, Any]:
    data = MessageToDict(
        volume, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["size_bytes"] = int(data.get("size_bytes", 0))
    data["epoch"] = int(data.get("epoch", 0))
    for copy in data["copies"]:
        copy["used_bytes"] = int(copy.get("used_bytes", 0))
        copy["lag_seconds"] = round(float(copy.get("lag_seconds", 0.0)), 1)
    data["diverged"] = [_aside_dict(aside) for aside in volume.diverged]
    if volume.HasField("move"):
        for key in ("bytes_sent", "bytes_total", "attempt_bytes_sent"):
            data["move"][key] = int(data["move"].get(key, 0))
    else:
        data.pop("move", None)
    return data


def _aside_dict(aside: control_pb2.AsideCopy) -> dict[str, Any]:
    data = MessageToDict(
        aside, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["epoch"] = int(data.get("epoch", 0))
    data["used_bytes"] = int(data.get("used_bytes", 0))
    return data


def _emit(
    output: str,
    rows: list[dict[str, Any]],
    columns: list[str],
    single: bool = False,
    whole: bool = False,
) -> None:
    """Rows as JSON, YAML or a table; ``whole`` prints every cell unshortened, however wide
    (dataset names an operator copies into the next command)."""
    if output == "json":
        click.echo(json.dumps(rows[0] if single else rows, indent=2, sort_keys=True))
    elif output == "yaml":
        click.echo(yaml.safe_dump(rows[0] if single else rows, sort_keys=True), nl=False)
    else:
        table = _table(rows, columns)
        if not whole:
            console.print(table)
            return
        needed = console.measure(table, options=console.options.update_width(1 << 16)).maximum
        Console(width=max(console.width, needed)).print(table)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(*[c.upper() for c in columns], box=None, pad_edge=False)
    for row in rows:
        table.add_row(*[_cell(row, c) for c in columns])
    return table


def _emit_stuck(output: str, copies: list[tuple[str, str]]) -> None:
    """Below a table, one line per node where something runs too long for the volume (the
    JSON and YAML output carry it in their fields)."""
    if output == "table":
        for node, stuck in copies:
            if stuck:
                click.echo(f"stuck on {node}: {stuck}")


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "size":
        return _human(row.get("size_bytes", 0))
    if column == "move":
        move = row.get("move")
        return f"{move['phase']} {move['source']}->{move['target']}" if move else "-"
    if column == "mounted_on":
        return ",".join(row.get("mounted_on") or []) or "-"
    if column == "copies":
        copies = row.get("copies") or []
        return ",".join(c["node"] + ("(rw)" if c["writable"] else "") for c in copies) or "-"
    if column == "rpo":
        if not row.get("replicas"):
            return "-"
        state = "ok" if row.get("meets_rpo") else "OUT"
        return f"{state}/{row['rpo_seconds']}s"
    if column == "lag":
        return f"{row['lag_seconds']:.1f}s" if row.get("newest_snapshot_at") else "-"
    if column == "newest_snapshot":
        return str(row.get("newest_snapshot") or "-")
    if column == "free":
        return _human(int(row.get("free_bytes", 0)))
    if column == "used":
        return _human(int(row.get("used_bytes", 0)))
    if column == "time":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(row.get("at", 0))))
    if column == "pause":
        pause = float(row.get("pause_seconds", 0))
        return f"{pause:.2f}s" if pause else "-"
    if column == "kept":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.get("kept_at", 0)))
    if column == "dataset" and row.get("drop_requested"):
        return f"{row['dataset']} (drop requested)"
    if column == "cert_expires":
        expiry = float(row.get("cert_not_after", 0))
        return time.strftime("%Y-%m-%d", time.gmtime(expiry)) if expiry else "-"
    return str(row.get(column, ""))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{size}B"


VOLUME_COLUMNS = [
    "name",
    "size",
    "compression",
    "node",
    "owner",
    "epoch",
    "copies",
    "mounted_on",
    "move",
    "rpo",
]
COPY_COLUMNS = ["node", "role", "newest_snapshot", "lag", "writable"]
ASIDE_COLUMNS = ["node", "dataset", "kept", "epoch", "used", "reason"]


@main.group()
def volume() -> None:
    """Create, inspect, move and delete volumes."""


def _replication_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--replicas", type=int, default=None, help="Standby copies besides the owner's."
            ),
            click.option("--rpo", default="", help="Most data, in time, a lost host may cost."),
            click.option(
                "--replace-after",
                default="",
                help="How long a replica's node may be down before it is replaced.",
            ),
        ]
    ):
        command = option(command)
    return command


@volume.command("create")
@click.argument("name")
@click.option("--size", default="", help="e.g. 512M, 10G, or bytes (default 1G).")
@click.option("--compression", default="", help="off, on, lzjb, gzip, gzip-N, zle.")
@click.option("--node", default="", help="Node to create it on (default: most free space).")
@click.option(
    "--failover",
    type=click.Choice(["manual", "auto"]),
    default=None,
    help="auto: fail over by itself once the owner's node is gone --failover-after "
    "[default: manual, by 'ferryctl volume failover'].",
)
@click.option(
    "--failover-after",
    type=float,
    default=0.0,
    help="Seconds the owner's node must be gone before an auto failover [default: 30].",
)
@_replication_options
@OUTPUT
@click.pass_obj
def volume_create(
    api: Api,
    name: str,
    size: str,
    compression: str,
    node: str,
    replicas: int | None,
    rpo: str,
    replace_after: str,
    failover: str | None,
    failover_after: float,
    output: str,
) -> None:
    """Create a volume (with --replicas N, N standby copies kept within --rpo, e.g. 15s)."""
    created = api.call(
        "CreateVolume",
        control_pb2.CreateVolumeRequest(
            name=name,
            size=size,
            compression=compression,
            node=node,
            failover=failover or "",
            failover_after=failover_after,
            replicas=replicas,
            rpo=rpo,
            replace_after=replace_after,
        ),
    )
    _emit(output, [_volume_dict(created)], VOLUME_COLUMNS, single=True)


@volume.command("update")
@click.argument("name")
@click.option("--size", default="", help="New size.")
@click.option("--compression", default="", help="New compression.")
@_replication_options
@OUTPUT
@click.pass_obj
def volume_update(
    api: Api,
    name: str,
    size: str,
    compression: str,
    replicas: int | None,
    rpo: str,
    replace_after: str,
    output: str,
) -> None:
    """Change a volume's size, compression or replication; what is not given stays."""
    updated = api.call(
        "UpdateVolume",
        control_pb2.CreateVolumeRequest(
            name=name,
            size=size,
            compression=compression,
            replicas=replicas,
            rpo=rpo,
            replace_after=replace_after,
        ),
    )
    _emit(output, [_volume_dict(updated)], VOLUME_COLUMNS, single=True)


@volume.command("list")
@OUTPUT
@WATCH
@INTERVAL
@click.pass_obj
def volume_list(api: Api, output: str, watch: bool, interval: float) -> None:
    """List volumes (--watch: and follow them, redrawn in place, until Ctrl-C)."""
    if watch:
        display = live.Display(output, "name", lambda rows: _table(rows, VOLUME_COLUMNS), console)
        live.follow(display, live.every(interval, _volume_rows(api), time.sleep))
        return
    reply = api.call("ListVolumes", control_pb2.ListVolumesRequest())
    _emit(output, [_volume_dict(v) for v in reply.volumes], VOLUME_COLUMNS)
    for record in reply.unreadable:
        click.echo(
            f"ferryctl: skipped unreadable record {record.key}: {record.reason}; fix or delete "
            f"it with etcdctl (its volume is not converged meanwhile)",
            err=True,
        )


def _volume_rows(api: Api) -> Callable[[], list[dict[str, Any]]]:
    """Reads of the volume list for --watch; while control cannot be reached, the last one."""
    last: list[dict[str, Any]] = []

    def read() -> list[dict[str, Any]]:
        nonlocal last
        try:
            reply = api.stub.ListVolumes(control_pb2.ListVolumesRequest(), timeout=30)
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                fail(_rpc_message(error))
            return last
        last = [_volume_dict(v) for v in reply.volumes]
        return last

    return read


@volume.command("get")
@click.argument("name")
@OUTPUT
@click.pass_obj
def volume_get(api: Api, name: str, output: str) -> None:
    """Show one volume, with its owner, move and diverged copies kept aside."""
    reply = api.call("GetVolume", control_pb2.GetVolumeRequest(name=name))
    found = _volume_dict(reply)
    _emit(output, [found], VOLUME_COLUMNS, single=True)
    if reply.create_error and output == "table":
        click.echo(
            f"failed: node {reply.node} could not create it: {reply.create_error}; "
            f"'ferryctl volume update {name} --size SIZE' tries again, or delete it"
        )
    if reply.HasField("move") and reply.move.error and output == "table":
        click.echo(f"move {reply.move.phase}, last error: {reply.move.error}")
    _emit_stuck(output, [(c.node, c.stuck) for c in reply.copies])
    if output == "table" and (reply.replicas or reply.copies):
        click.echo("")
        _emit(output, found["copies"], COPY_COLUMNS)
    if output == "table" and reply.replicas:
        verdict = "meets" if reply.meets_rpo else "does NOT meet"
        click.echo(
            f"\n{verdict} its rpo of {reply.rpo_seconds}s with {reply.replicas} replica(s) on "
            f"{', '.join(reply.replica_nodes) or 'no node yet'}"
        )
        for note in [*reply.replica_notes, *reply.replica_history]:
            click.echo(f"  {note}")
    if output == "table" and found["diverged"]:
        click.echo(
            f"\ndiverged copies kept aside (data written after the snapshot a stream built on; "
            f"'ferryctl volume aside drop {name} DATASET --node NODE' destroys one):"
        )
        _emit(output, found["diverged"], ASIDE_COLUMNS, whole=True)


@volume.group("aside")
def volume_aside() -> None:
    """Copies kept aside because they diverged: inspect and drop them."""


@volume_aside.command("list")
@click.argument("name", required=False, default="")
@OUTPUT
@click.pass_obj
def aside_list(api: Api, name: str, output: str) -> None:
    """List copies kept aside on live nodes, of volume NAME or of every volume."""
    reply = api.call("ListAsides", control_pb2.ListAsidesRequest(volume=name))
    rows = [_aside_dict(aside) for aside in reply.asides]
    _emit(output, rows, ["volume", *ASIDE_COLUMNS], whole=True)


@volume_aside.command("drop")
@click.argument("name")
@click.argument("dataset")
@click.option("--node", required=True, help="The node that keeps the copy.")
@click.pass_obj
def aside_drop(api: Api, name: str, dataset: str, node: str) -> None:
    """Destroy the copy DATASET of volume NAME that NODE keeps aside (its data is lost)."""
    api.call("DropAside", control_pb2.DropAsideRequest(volume=name, node=node, dataset=dataset))
    click.echo(f"drop of {dataset} requested; {node}'s agent destroys it and stops listing it")


@volume.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even while mounted.")
@click.pass_obj
def volume_delete(api: Api, name: str, force: bool) -> None:
    """Delete a volume cluster-wide (agents destroy its data)."""
    reply = api.call("DeleteVolume", control_pb2.DeleteVolumeRequest(name=name, force=force))
    click.echo(f"volume {name} deleted" + (f"; {reply.notice}" if reply.notice else ""))


@volume.command("move")
@click.argument("name")
@click.argument("node")
@click.option("--wait", is_flag=True, help="Follow the move; exit 0 once the target owns it.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@click.pass_obj
def volume_move(api: Api, name: str, node: str, wait: bool, timeout: float) -> None:
    """Move a volume to NODE (pre-copy now, handoff once nothing mounts it).

    Moving it back to the node it is leaving cancels a move that has not handed off yet.
    """
    moved = api.call("MoveVolume", control_pb2.MoveVolumeRequest(name=name, node=node))
    if not moved.HasField("move") or (moved.owner == node and not _moving(moved)):
        ended = moved.move.error if moved.move.phase == MovePhase.FAILED else ""
        click.echo(f"volume {name} is on {node}" + (f" (its last move: {ended})" if ended else ""))
        return
    click.echo(f"volume {name}: moving {moved.move.source} -> {node}")
    if wait:
        _follow(api, name, node, timeout)


@volume.command("failover")
@click.argument("name")
@click.option("--to", "node", default="", help="The node to promote [default: newest copy].")
@click.pass_obj
def volume_failover(api: Api, name: str, node: str) -> None:
    """Make a standby copy the owner while the owner's node is down, and say what is lost.

    Refused while the owner is live: 'volume move' then hands over without loss.
    """
    reply = api.call("FailoverVolume", control_pb2.FailoverVolumeRequest(name=name, node=node))
    click.echo(
        f"volume {name} failed over from {reply.old_owner} to {reply.volume.owner} "
        f"(epoch {reply.volume.epoch}), from snapshot {reply.snapshot}"
    )
    click.echo(reply.lost)


def _moving(volume: control_pb2.Volume) -> bool:
    return volume.HasField("move") and volume.move.phase not in ENDED_PHASES


def _cancellable(volume: control_pb2.Volume) -> bool:
    return volume.HasField("move") and volume.move.phase in ACTIVE_PHASES


def _follow(api: Api, name: str, node: str, timeout: float) -> None:
    """A live progress bar until the move is done (return) or failed or late (exit non-zero).

    The bar is closed before any error is printed, so the error is stderr's last line.
    """
    columns = (
        TextColumn("{task.fields[phase]:<20}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    failure = f"move of {name} did not finish in time; 'ferryctl move status {name}' follows it"
    deadline = time.monotonic() + timeout
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(name, total=None, phase=MovePhase.PENDING.value, rate="")
        try:
            for current in _watch(api, name, deadline):
                move = current.move
                progress.update(
                    task,
                    completed=move.bytes_sent,
                    total=move.bytes_total or None,
                    phase=move.phase,
                    rate=f"{filesize.decimal(int(move.rate_bps))}/s" if move.rate_bps else "",
                )
                if move.phase == MovePhase.FAILED:
                    failure = f"move of {name} failed: {move.error or 'see the agents logs'}"
                    break
                if current.owner == node and move.phase == MovePhase.DONE:
                    failure = ""
                    break
        except grpc.RpcError as error:
            failure = _rpc_message(error)
    if failure:
        fail(failure)
    click.echo(f"volume {name} is on {node}")


def _watch(api: Api, name: str, deadline: float) -> Iterator[control_pb2.Volume]:
    """Updates of one volume until the deadline; a restarting ferry-control is waited for."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            yield from api.stub.WatchVolume(
                control_pb2.GetVolumeRequest(name=name), timeout=remaining
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(min(RECONNECT_SECONDS, remaining))
            elif error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise


@main.group()
def move() -> None:
    """Follow moves."""


@move.command("cancel")
@click.argument("name")
@click.pass_obj
def move_cancel(api: Api, name: str) -> None:
    """Cancel a move that has not handed off: the volume stays on its source (up or down)."""
    found = api.call("GetVolume", control_pb2.GetVolumeRequest(name=name))
    if not _cancellable(found):
        fail(f"volume {name} has no move to cancel ('ferryctl move status {name}' shows the last)")
    source = found.move.source
    api.call("MoveVolume", control_pb2.MoveVolumeRequest(name=name, node=source))
    click.echo(f"move of {name} cancelled: it stays on {source}")


MOVE_COLUMNS = ["name", "phase", "source", "target", "bytes_sent", "bytes_total", "rate", "error"]
WATCH_FOR_EVER_SECONDS = 365 * 86400.0


@move.command("status")
@click.argument("name")
@OUTPUT
@WATCH
@click.pass_obj
def move_status(api: Api, name: str, output: str, watch: bool) -> None:
    """Show the current or last move of a volume (--watch: and follow it until Ctrl-C)."""
    if watch:
        display = live.Display(output, "name", lambda rows: _table(rows, MOVE_COLUMNS), console)
        updates = _watch(api, name, time.monotonic() + WATCH_FOR_EVER_SECONDS)
        try:
            live.follow(display, ([_move_row(name, current)] for current in updates))
        except grpc.RpcError as error:
            fail(_rpc_message(error))
        return
    found = api.call("GetVolume", control_pb2.GetVolumeRequest(name=name))
    if not found.HasField("move"):
        fail(f"volume {name} has never moved")
    data = _volume_dict(found)["move"]
    moving = (found.move.source, found.move.target)
    _emit(
        output,
        [data],
        ["phase", "source", "target", "bytes_sent", "bytes_total", "attempt_bytes_sent", "error"],
        single=True,
    )
    _emit_stuck(output, [(c.node, c.stuck) for c in found.copies if c.node in moving])


def _move_row(name: str, volume: control_pb2.Volume) -> dict[str, Any]:
    """The volume's move as one row (phase ``-`` before its first move)."""
    if not volume.HasField("move"):
        return {"name": name, "phase": "-"}
    row = {"name": name, **_volume_dict(volume)["move"]}
    rate = float(row.get("rate_bps", 0))
    row["rate"] = f"{filesize.decimal(int(rate))}/s" if rate else ""
    return row


EVENT_COLUMNS = ["time", "volume", "kind", "by", "pause", "detail"]


@main.command("events")
@click.option("--volume", "name", default="", help="Only this volume's events.")
@click.option("-f", "--follow", is_flag=True, help="Then each new event, until Ctrl-C.")
@OUTPUT
@click.pass_obj
def events(api: Api, name: str, follow: bool, output: str) -> None:
    """What happened to volumes, oldest first (kept for 7 days): created, moved, handed off
    with its pause, fenced, diverged copy kept, failed over, errors."""
    request = control_pb2.WatchEventsRequest(volume=name, follow=follow)
    stream = api.stub.WatchEvents(request, timeout=None if follow else 30)
    try:
        if not follow:
            _emit(output, [_event_dict(e) for e in stream], EVENT_COLUMNS, whole=True)
            return
        if output == "table":
            click.echo("  ".join(c.upper() for c in EVENT_COLUMNS))
        for event in stream:
            row = _event_dict(event)
            if output == "json":
                click.echo(json.dumps(row, sort_keys=True))
            elif output == "yaml":
                click.echo("---\n" + yaml.safe_dump(row, sort_keys=True), nl=False)
            else:
                click.echo("  ".join(_cell(row, c) for c in EVENT_COLUMNS))
    except grpc.RpcError as error:
        fail(_rpc_message(error))
    except KeyboardInterrupt:
        stream.cancel()


def _event_dict(event: control_pb2.Event) -> dict[str, Any]:
    return MessageToDict(
        event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


@main.group()
def node() -> None:
    """Inspect nodes."""


@node.command("list")
@OUTPUT
@click.pass_obj
def node_list(api: Api, output: str) -> None:
    """List live nodes."""
    reply = api.call("ListNodes", control_pb2.ListNodesRequest())
    rows = [
        {**MessageToDict(n, preserving_proto_field_name=True), "free_bytes": n.free_bytes}
        for n in reply.nodes
    ]
    _emit(output, rows, ["name", "status", "address", "pool", "free", "version", "cert_expires"])
    if output == "table":
        _replica_nodes_down(api, {n.name for n in reply.nodes})


def _replica_nodes_down(api: Api, live: set[str]) -> None:
    """Below the node table: replicas on nodes that are down, and replicas re-placed."""
    volumes = api.call("ListVolumes", control_pb2.ListVolumesRequest()).volumes
    for found in volumes:
        for node in found.replica_nodes:
            if node not in live:
                click.echo(
                    f"{node} is down and holds a replica of {found.name}: it is placed on "
                    f"another node once down for {found.replace_after_seconds}s"
                )
        for event in found.replica_history:
            click.echo(f"{found.name}: {event}")


def _plan(api: Api, file: Path, prune: bool) -> list[tuple[Change, Declared | None]]:
    try:
        declared = parse(file.read_text(), str(file))
    except OSError as error:
        fail(f"cannot read {file}: {error.strerror}")
    except DeclarationError as error:
        fail(str(error))
    reply = api.call("ListVolumes", control_pb2.ListVolumesRequest())
    current = {
        v.name: Current(
            v.name,
            v.size_bytes,
            v.compression,
            v.node,
            replicas=v.replicas,
            rpo_seconds=v.rpo_seconds,
            replace_after_seconds=v.replace_after_seconds,
            failover=v.failover,
            failover_after=v.failover_after,
        )
        for v in reply.volumes
    }
    by_name = {d.name: d for d in declared}
    return [(change, by_name.get(change.name)) for change in changes(declared, current, prune)]


@main.command("diff")
@DECLARED_FILE
@click.option("--prune", is_flag=True, help="Also show deletions of volumes not in the file.")
@OUTPUT
@click.pass_obj
def diff(api: Api, file: Path, prune: bool, output: str) -> None:
    """Show what 'apply' would change."""
    planned = _plan(api, file, prune)
    _emit(output, [asdict(change) for change, _ in planned], ["action", "name", "detail"])


@main.command("apply")
@DECLARED_FILE
@click.option("--prune", is_flag=True, help="Delete volumes that are not in the file.")
@click.option("--dry-run", is_flag=True, help="Only show what would change.")
@click.option(
    "--parallelism",
    type=click.IntRange(1, 64),
    default=APPLY_PARALLELISM,
    show_default=True,
    help="Changes sent to control at once.",
)
@click.pass_obj
def apply(api: Api, file: Path, prune: bool, dry_run: bool, parallelism: int) -> None:
    """Make the cluster match a file of volumes (idempotent).

    Each change is one call to control. The changes of one volume are made in
    order (a move before a resize), and up to ``--parallelism`` volumes at once.
    A change that fails is reported, its volume's later changes are skipped and
    the other volumes go on; then apply exits 1, and running it again does what
    is left.
    """
    planned = _plan(api, file, prune)
    if not planned:
        click.echo("nothing to change")
        return
    for change, _ in planned:
        click.echo(f"{'would ' if dry_run else ''}{change.action} {change.name}: {change.detail}")
    if dry_run:
        return
    by_volume: dict[str, list[tuple[Change, Declared | None]]] = {}
    for change, wanted in planned:
        by_volume.setdefault(change.name, []).append((change, wanted))
    with ThreadPoolExecutor(max_workers=parallelism) as pool:
        outcomes = list(pool.map(lambda changes: _apply_volume(api, changes), by_volume.values()))
    failed = [failure for failure in outcomes if failure is not None]
    for change, error in failed:
        click.echo(f"ferryctl: {change.action} {change.name} failed: {error}", err=True)
    if failed:
        fail(
            f"{len(failed)} of {len(by_volume)} volumes were not changed as the file says "
            f"(above); the others were. Fix the cause and run apply again: it does only what "
            f"is left"
        )


def _apply_volume(
    api: Api, planned: list[tuple[Change, Declared | None]]
) -> tuple[Change, str] | None:
    """One volume's changes in order, until one fails: that change and its error."""
    for change, wanted in planned:
        error = _apply_change(api, change, wanted)
        if error:
            return change, error
    return None


def _apply_change(api: Api, change: Change, wanted: Declared | None) -> str:
    """One planned change, as one call to control; the error, or empty when it was made."""
    request: Message
    if change.action == "delete":
        method, request = "DeleteVolume", control_pb2.DeleteVolumeRequest(name=change.name)
    elif change.action == "move":
        assert wanted is not None
        method, request = (
            "MoveVolume",
            control_pb2.MoveVolumeRequest(name=wanted.name, node=wanted.node),
        )
    else:
        assert wanted is not None
        method = "CreateVolume" if change.action == "create" else "UpdateVolume"
        request = control_pb2.CreateVolumeRequest(
            name=wanted.name,
            size=wanted.size,
            compression=wanted.compression,
            node=wanted.node if change.action == "create" else "",
            replicas=wanted.replicas,
            rpo=wanted.rpo,
            replace_after=wanted.replace_after,
            failover=wanted.failover,
            failover_after=wanted.failover_after,
        )
    try:
        getattr(api.stub, method)(request, timeout=30.0)
    except grpc.RpcError as error:
        return _rpc_message(error)
    return ""


@main.group("ca")
def ca_group() -> None:
    """The cluster CA and its certificates."""


@ca_group.command("init")
@CA_DIR
def ca_init(directory: Path) -> None:
    """Create a cluster CA in DIR."""
    try:
        path = ca.init(directory)
    except ca.CAError as error:
        fail(str(error))
    click.echo(f"CA certificate: {path}")


@ca_group.command("issue")
@CA_DIR
@click.option("--kind", type=click.Choice(ca.KINDS), required=True)
@click.option(
    "--name",
    required=True,
    help="Identity: node name, 'control', a user name, an etcd member's name, or 'root'.",
)
@click.option("--ip", "ips", multiple=True, help="IP address the holder serves on (repeatable).")
@click.option("--dns", "dns", multiple=True, help="Extra DNS name (repeatable).")
def ca_issue(
    directory: Path, kind: str, name: str, ips: tuple[str, ...], dns: tuple[str, ...]
) -> None:
    """Issue a certificate and key signed by the CA in DIR."""
    try:
        cert, key = ca.issue(directory, kind, name, ips, dns)
    except ca.CAError as error:
        fail(str(error))
    click.echo(f"certificate: {cert}\nkey: {key}")


def _named_addresses(entries: tuple[str, ...], flag: str) -> dict[str, tuple[str, ...]]:
    """NAME=IP[,IP...] entries -> {NAME: (IP, ...)}."""
    named = {}
    for entry in entries:
        name, _, ips = entry.partition("=")
        if not name or not ips:
            fail(f"{flag} {entry!r}: give NAME=IP or NAME=IP,IP")
        named[name] = tuple(ips.split(","))
    return named


@ca_group.command("issue-cluster")
@CA_DIR
@click.option("--control", "control_ips", multiple=True, help="IP control serves on (repeatable).")
@click.option("--node", "nodes", multiple=True, help="NAME=IP of a node (repeatable).")
@click.option("--etcd", "etcd_members", multiple=True, help="NAME=IP[,IP] of an etcd member.")
@click.option("--user", "users", multiple=True, help="A user (operator) name (repeatable).")
def ca_issue_cluster(
    directory: Path,
    control_ips: tuple[str, ...],
    nodes: tuple[str, ...],
    etcd_members: tuple[str, ...],
    users: tuple[str, ...],
) -> None:
    """Make a cluster's CA and certificates in DIR: control, each node, each etcd member,
    each user and etcd's root. Keeps an existing CA and existing certificates."""
    try:
        issued = ca.issue_cluster(
            directory,
            control_ips=control_ips,
            nodes=_named_addresses(nodes, "--node"),
            etcd_members=_named_addresses(etcd_members, "--etcd"),
            users=users,
        )
    except ca.CAError as error:
        fail(str(error))
    click.echo(f"issued in {directory}: {', '.join(issued) or 'nothing new'}")
