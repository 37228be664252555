"""What the agent's /metrics says of replication and of its etcd operations, read as
Prometheus reads it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics
from ferry.cluster import timing
from ferry.cluster.timing import timed_operations


def _scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.REGISTRY).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample(name: str, **labels: str) -> float | None:
    return _scrape().get((name, frozenset(labels.items())))


@pytest.fixture
def replicated() -> Iterator[str]:
    volume = "mt-replicated"
    yield volume
    metrics.forget_replication(volume)


def _show(volume: str, rpo: int, unplaced: int, *replicas: metrics.ReplicaView) -> None:
    metrics.show_replication(metrics.ReplicationView(volume, rpo, unplaced, replicas))


def test_each_replicas_lag_and_last_success_and_the_rpo_verdict(replicated: str) -> None:
    now = time.time()
    _show(replicated, 15, 0, metrics.ReplicaView("host2", now - 5, now - 4))
    lag = _sample("ferry_volume_replication_lag_seconds", volume=replicated, replica="host2")
    assert lag is not None and 5 <= lag < 6
    success = "ferry_volume_replication_last_success_timestamp_seconds"
    assert _sample(success, volume=replicated, replica="host2") == pytest.approx(now - 4)
    assert _sample("ferry_volume_rpo_met", volume=replicated) == 1


def test_a_replica_behind_its_rpo_or_one_not_placed_misses_it(replicated: str) -> None:
    now = time.time()
    current = metrics.ReplicaView("host2", now - 1, now - 1)
    _show(replicated, 15, 0, current, metrics.ReplicaView("host3", now - 20, 0.0))
    assert _sample("ferry_volume_rpo_met", volume=replicated) == 0
    # A replica never sent to since this node began has no last-success sample.
    success = "ferry_volume_replication_last_success_timestamp_seconds"
    assert _sample(success, volume=replicated, replica="host3") is None
    _show(replicated, 15, 1, current)
    assert _sample("ferry_volume_rpo_met", volume=replicated) == 0


def test_a_replica_that_stops_answering_misses_the_rpo_between_two_rounds(
    replicated: str,
) -> None:
    """The verdict is worked out at scrape time, not at the last round."""
    _show(replicated, 3, 0, metrics.ReplicaView("host2", time.time() - 2.5, time.time()))
    assert _sample("ferry_volume_rpo_met", volume=replicated) == 1
    time.sleep(0.6)
    assert _sample("ferry_volume_rpo_met", volume=replicated) == 0


def test_a_volume_whose_replication_ended_leaves_the_metrics(replicated: str) -> None:
    _show(replicated, 15, 0, metrics.ReplicaView("host2", time.time(), time.time()))
    metrics.forget_replication(replicated)
    assert _sample("ferry_volume_rpo_met", volume=replicated) is None
    lag = _sample("ferry_volume_replication_lag_seconds", volume=replicated, replica="host2")
    assert lag is None


@timed_operations
class _Keyspace:
    """Stands for ferry.cluster.keyspace.Keyspace: one operation calls another."""

    async def get_move(self) -> str:
        return "move"

    async def purge_volume(self) -> str:
        return await self.get_move()

    async def put_state(self) -> None:
        raise ConnectionError("etcd unreachable")


async def test_every_keyspace_operation_is_timed_once_and_its_errors_counted() -> None:
    metrics.watch_etcd()
    metrics.watch_etcd()  # the agent may start twice in one process (tests): counted once
    count = "ferry_etcd_operation_duration_seconds_count"
    errors = "ferry_etcd_operation_errors_total"
    before = {op: _sample(count, operation=op) or 0 for op in ("get_move", "purge_volume")}
    failed = _sample(errors, operation="put_state") or 0
    keyspace = _Keyspace()
    assert await keyspace.get_move() == "move"
    assert await keyspace.purge_volume() == "move"
    with pytest.raises(ConnectionError):
        await keyspace.put_state()
    assert _sample(count, operation="get_move") == before["get_move"] + 1  # not again inside
    assert _sample(count, operation="purge_volume") == before["purge_volume"] + 1
    assert _sample(errors, operation="put_state") == failed + 1


async def test_a_removed_observer_is_told_of_no_more_operations() -> None:
    seen: list[str] = []

    def observe(operation: str, seconds: float, failed: bool) -> None:
        seen.append(operation)

    timing.add_observer(observe)
    await _Keyspace().get_move()
    timing.remove_observer(observe)
    await _Keyspace().get_move()
    assert seen == ["get_move"]
