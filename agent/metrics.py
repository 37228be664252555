"""Every metric ferry-agent exports, defined once (names: docs/operations.md, the dashboard:
deploy/grafana-dashboard.json; tests/unit/test_metric_names.py keeps the three in step).

Counters and histograms are counted where the thing happens (a handoff, a
command, a connection). What a volume or a move *is* now (state, role,
epoch, bytes, phase) is a view the convergence loop replaces after each
pass (``show_volumes``, ``show_moves``) and the collector reads at scrape
time, so a volume that left this node leaves the metrics with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.zfs import runner
from ferry.core.records import Move, MovePhase

REGISTRY = CollectorRegistry()

VOLUME_STATES = ("writable", "readonly", "stuck", "unreadable")
VOLUME_ROLES = ("owner", "copy")
MOVE_PHASES = tuple(phase.value for phase in MovePhase)
# Handoff pauses: from the freeze to the ownership swap (typically well under a second).
PAUSE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ZFS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

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


class _Views(Collector):
    """The per-volume and per-move gauges, from the last pass's views. A replica's lag is
    ``time() - ferry_volume_newest_snapshot_timestamp_seconds`` (its newest snapshot's age);
    whether the RPO is met is control's answer to the same question (``volume get``)."""

    def __init__(self) -> None:
        self.volumes: tuple[VolumeView, ...] = ()
        self.moves: tuple[Move, ...] = ()

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
        yield from (phase, sent, attempt, total, rate)


_VIEWS = _Views()
REGISTRY.register(_VIEWS)


def show_volumes(views: Iterable[VolumeView]) -> None:
    _VIEWS.volumes = tuple(views)


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
