"""Every metric ferry-agent exports, defined once (names: docs/operations.md, the dashboard:
deploy/grafana-dashboard.json; tests/unit/test_metric_names.py keeps the three in step).

Counters and histograms are counted where the thing happens (a handoff, a
command, a keyspace operation, a connection). What a volume or a move *is* now
(state, role, epoch, bytes, phase) is a view the convergence loop replaces
after each pass (``show_volumes``, ``show_moves``), and a volume's replication
one its replication loop replaces after each round (``show_replication``);
the collector reads them at scrape time, so a volume that left this node
leaves the metrics with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.zfs import runner
from ferry.cluster import timing
from ferry.core.records import Move, MovePhase

REGISTRY = CollectorRegistry()

VOLUME_STATES = ("writable", "readonly", "stuck", "unreadable")
VOLUME_ROLES = ("owner", "copy")
MOVE_PHASES = tuple(phase.value for phase in MovePhase)
# Handoff pauses: from the freeze to the ownership swap (typically well under a second).
PAUSE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ZFS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# etcd operations: a few ms on a healthy cluster; seconds mean a slow disk or a lost leader.
ETCD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

MOVE_HANDOFF_PAUSE = Histogram(
    "ferry_move_handoff_pause_seconds",
    "Writes stopped on the source during a handoff: freeze to ownership swap.",
    buckets=PAUSE_BUCKETS,
    registry=REGISTRY,
)
MOVE_HANDOFFS = Counter(
    "ferry_move_handoffs_total",
    "Moves this node handed off (ownership swapped to the target).",
    registry=REGISTRY,
)
MOVE_SENT = Counter(
    "ferry_move_sent_bytes_total",
    "Snapshot stream bytes this node sent for moves, every attempt counted.",
    registry=REGISTRY,
)
MOVE_FAILURES = Counter(
    "ferry_move_failures_total",
    "Move attempts that failed on this node (the move retries), by reason.",
    ["reason"],
    registry=REGISTRY,
)
ZFS_COMMAND_DURATION = Histogram(
    "ferry_zfs_command_duration_seconds",
    "ZFS, mount and libzfs_core commands, until they ended or were given up.",
    ["command"],
    buckets=ZFS_BUCKETS,
    registry=REGISTRY,
)
ZFS_COMMAND_ERRORS = Counter(
    "ferry_zfs_command_errors_total",
    "ZFS commands that failed, timed out or were stopped, by outcome.",
    ["command", "outcome"],
    registry=REGISTRY,
)
ETCD_OPERATION_DURATION = Histogram(
    "ferry_etcd_operation_duration_seconds",
    "Keyspace operations on etcd (get_move, put_state, transfer_owner, ...), until they "
    "answered or failed.",
    ["operation"],
    buckets=ETCD_BUCKETS,
    registry=REGISTRY,
)
ETCD_OPERATION_ERRORS = Counter(
    "ferry_etcd_operation_errors_total",
    "Keyspace operations on etcd that raised (etcd unreachable, timed out, a record unreadable).",
    ["operation"],
    registry=REGISTRY,
)
LEASE_RENEW_FAILURES = Counter(
    "ferry_etcd_lease_renew_failures_total",
    "Failed refreshes of this node's etcd lease (error: etcd unreachable; expired: lost).",
    ["reason"],
    registry=REGISTRY,
)
FENCED = Counter(
    "ferry_volume_fenced_total",
    "Copies this node fenced: it found its epoch stale and stopped their writes.",
    registry=REGISTRY,
)
DATA_ACCEPTED = Counter(
    "ferry_data_connections_accepted_total",
    "Data-port connections admitted with a valid ticket.",
    registry=REGISTRY,
)
DATA_REFUSED = Counter(
    "ferry_data_connections_refused_total",
    "Data-port connections closed before admission, by reason.",
    ["reason"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class VolumeView:
    """One volume this node holds, as the last convergence pass saw it."""

    volume: str
    state: str
    role: str
    epoch: int
    used_bytes: int
    newest_snapshot_at: float = 0.0
    replication_failing: bool = False


@dataclass(frozen=True)
class ReplicaView:
    """One replica of a volume this node owns, as its replication loop last saw it."""

    replica: str
    synced_at: float
    """Wall time of the newest snapshot the replica confirmed (or when replication began)."""
    succeeded_at: float = 0.0
    """When the last send to it succeeded (0: none since this node began replicating)."""


@dataclass(frozen=True)
class ReplicationView:
    """A volume this node owns with replicas: its RPO, how many replicas are not placed, and
    each placed one."""

    volume: str
    rpo_seconds: int
    unplaced: int
    replicas: tuple[ReplicaView, ...]

    def rpo_met(self, now: float) -> bool:
        """Every replica placed and none further behind than the RPO."""
        return not self.unplaced and all(
            now - replica.synced_at <= self.rpo_seconds for replica in self.replicas
        )


class _Views(Collector):
    """The per-volume and per-move gauges, from the last pass's views, and the owner's
    replication gauges, from each volume's last replication round. Lag and RPO are worked out
    at scrape time from when each replica's newest confirmed snapshot was taken: a replica
    that stopped answering grows late between two rounds too."""

    def __init__(self) -> None:
        self.volumes: tuple[VolumeView, ...] = ()
        self.moves: tuple[Move, ...] = ()
        self.replication: dict[str, ReplicationView] = {}

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "ferry_volume_state",
            "1 for the state each volume held here is in (writable, readonly, stuck, "
            "unreadable), 0 for the others.",
            labels=["volume", "state"],
        )
        role = GaugeMetricFamily(
            "ferry_volume_role",
            "1 for this node's role for each volume it holds (owner or copy).",
            labels=["volume", "role"],
        )
        epoch = GaugeMetricFamily(
            "ferry_volume_epoch", "The volume's owner epoch.", labels=["volume"]
        )
        used = GaugeMetricFamily(
            "ferry_volume_used_bytes", "Bytes the volume's dataset uses here.", labels=["volume"]
        )
        newest = GaugeMetricFamily(
            "ferry_volume_newest_snapshot_timestamp_seconds",
            "When the newest snapshot this node holds of each volume was taken (Unix time).",
            labels=["volume"],
        )
        failing = GaugeMetricFamily(
            "ferry_volume_replication_failing",
            "1 while this owner cannot keep a replica of the volume current.",
            labels=["volume"],
        )
        for view in self.volumes:
            if view.newest_snapshot_at:
                newest.add_metric([view.volume], view.newest_snapshot_at)
            failing.add_metric([view.volume], float(view.replication_failing))
            for name in VOLUME_STATES:
                state.add_metric([view.volume, name], float(view.state == name))
            for name in VOLUME_ROLES:
                role.add_metric([view.volume, name], float(view.role == name))
            epoch.add_metric([view.volume], view.epoch)
            used.add_metric([view.volume], view.used_bytes)
        phase = GaugeMetricFamily(
            "ferry_move_phase",
            "1 for the phase of each move this node sends, 0 for the others.",
            labels=["volume", "phase"],
        )
        sent = GaugeMetricFamily(
            "ferry_move_bytes",
            "Bytes of each move this node sends that its target holds (a failed stream's "
            "until the next sync finds the target without it).",
            labels=["volume"],
        )
        attempt = GaugeMetricFamily(
            "ferry_move_attempt_bytes",
            "Bytes the current attempt of each move sent, a cut stream's included.",
            labels=["volume"],
        )
        total = GaugeMetricFamily(
            "ferry_move_expected_bytes",
            "Bytes each move is expected to have sent once its running stream ends.",
            labels=["volume"],
        )
        rate = GaugeMetricFamily(
            "ferry_move_rate_bytes_per_second",
            "Send rate of the last stream of each move this node sends.",
            labels=["volume"],
        )
        for move in self.moves:
            for name in MOVE_PHASES:
                phase.add_metric([move.volume, name], float(move.phase.value == name))
            sent.add_metric([move.volume], move.bytes_sent)
            attempt.add_metric([move.volume], move.attempt_bytes_sent)
            total.add_metric([move.volume], move.bytes_total)
            rate.add_metric([move.volume], move.rate_bps)
        yield from (state, role, epoch, used, newest, failing)
        yield from self._replication()
        yield from (phase, sent, attempt, total, rate)

    def _replication(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "ferry_volume_replication_lag_seconds",
            "Age of the newest snapshot each replica of a volume this node owns has confirmed.",
            labels=["volume", "replica"],
        )
        success = GaugeMetricFamily(
            "ferry_volume_replication_last_success_timestamp_seconds",
            "When the last send to each replica of a volume this node owns succeeded (Unix time).",
            labels=["volume", "replica"],
        )
        met = GaugeMetricFamily(
            "ferry_volume_rpo_met",
            "1 while every replica of a volume this node owns is placed and within its RPO.",
            labels=["volume"],
        )
        now = time.time()
        for view in list(self.replication.values()):
            met.add_metric([view.volume], float(view.rpo_met(now)))
            for replica in view.replicas:
                lag.add_metric([view.volume, replica.replica], max(0.0, now - replica.synced_at))
                if replica.succeeded_at:
                    success.add_metric([view.volume, replica.replica], replica.succeeded_at)
        yield from (lag, success, met)


_VIEWS = _Views()
REGISTRY.register(_VIEWS)


def show_volumes(views: Iterable[VolumeView]) -> None:
    _VIEWS.volumes = tuple(views)


def show_replication(view: ReplicationView) -> None:
    """A volume's replication, after each round of its loop."""
    _VIEWS.replication[view.volume] = view


def forget_replication(volume: str) -> None:
    """The volume's replication loop ended (moved away, no replicas any more)."""
    _VIEWS.replication.pop(volume, None)


def show_moves(moves: Iterable[Move]) -> None:
    """The moves this node sends now (their record in etcd)."""
    _VIEWS.moves = tuple(moves)


def failure_reason(error: BaseException) -> str:
    """A move failure's reason label: its exception class, a short fixed set of names."""
    return type(error).__name__


def command_label(argv: Sequence[str]) -> str:
    """``zfs send``, ``zpool list``, ``mount``, ``lzc_send``: program and verb, no arguments."""
    if not argv:
        return ""
    program = os.path.basename(argv[0])
    if program in ("zfs", "zpool") and len(argv) > 1 and not argv[1].startswith("-"):
        return f"{program} {argv[1]}"
    return program


def _observe_command(argv: tuple[str, ...], seconds: float, outcome: runner.Outcome) -> None:
    command = command_label(argv)
    ZFS_COMMAND_DURATION.labels(command).observe(seconds)
    if outcome != runner.Outcome.OK:
        ZFS_COMMAND_ERRORS.labels(command, outcome.value).inc()


def watch_commands() -> None:
    """Count every ZFS command from now on; the agent calls it once, at start."""
    runner.add_observer(_observe_command)


def _observe_operation(operation: str, seconds: float, failed: bool) -> None:
    ETCD_OPERATION_DURATION.labels(operation).observe(seconds)
    if failed:
        ETCD_OPERATION_ERRORS.labels(operation).inc()


def watch_etcd() -> None:
    """Time every keyspace operation from now on; the agent calls it at start."""
    timing.add_observer(_observe_operation)
