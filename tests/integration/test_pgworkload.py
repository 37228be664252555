"""The PostgreSQL workload against a real ferry/postgres:15 container on a private dockerd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from docker.models.containers import Container

from tests.support.docker_daemon import DockerDaemon
from tests.support.pgworkload import (
    RowsMissing,
    Writer,
    create_table,
    log_since_start,
    psql,
    recovery_problems,
    verify,
    wait_ready,
)

pytestmark = pytest.mark.integration

POSTGRES = "ferry/postgres:15"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DockerDaemon]:
    with DockerDaemon(prefix="im") as daemon:
        daemon.load_images(POSTGRES)
        yield daemon


@pytest.fixture
def database(
    daemon: DockerDaemon, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Container]:
    data = tmp_path / "pgdata"
    data.mkdir()
    container = daemon.client.containers.run(
        POSTGRES,
        name=f"{daemon.name}-{request.node.name}",
        network_mode="none",
        volumes={str(data): {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
        detach=True,
    )
    try:
        wait_ready(container, timeout=60)
        create_table(container)
        yield container
    finally:
        container.remove(force=True)


def restart(container: Container) -> None:
    container.start()
    wait_ready(container, timeout=60)


def test_rows_committed_before_a_clean_stop_are_there_after_restart(database: Container) -> None:
    writer = Writer(database).start()
    writer.wait_for_rows(300)

    database.stop(timeout=30)

    assert not writer.running, "the writer should end when the database goes away"
    assert writer.ended_because is not None
    committed = writer.committed
    restart(database)
    result = verify(database, committed)
    assert result.count == len(committed) >= 300
    assert result.uncertain <= 1
    startup = log_since_start(database)
    assert "database system was shut down at" in startup
    assert recovery_problems(startup) == []


def test_writer_stopped_on_request_records_exactly_what_is_stored(database: Container) -> None:
    writer = Writer(database, rows_per_commit=5).start()
    writer.wait_for_rows(100)

    committed = writer.stop()

    assert committed == tuple(range(1, len(committed) + 1))
    result = verify(database, committed)
    assert (result.count, result.uncertain) == (len(committed), 0)
    stored = int(psql(database, "SELECT count(*) FROM ferry_rows"))
    assert stored == len(committed)


def test_verify_names_a_committed_row_that_is_gone(database: Container) -> None:
    writer = Writer(database).start()
    writer.wait_for_rows(50)
    ids = writer.stop()
    verify(database, ids)

    psql(database, "DELETE FROM ferry_rows WHERE id = 17")

    with pytest.raises(RowsMissing, match=r"missing ids \(1\): \[17\]"):
        verify(database, ids)


def test_verify_notices_a_changed_row(database: Container) -> None:
    writer = Writer(database).start()
    writer.wait_for_rows(20)
    ids = writer.stop()

    psql(database, "UPDATE ferry_rows SET payload = 'tampered' WHERE id = 3")

    with pytest.raises(RowsMissing, match="checksum"):
        verify(database, ids)


def test_killed_database_recovers_every_committed_row(database: Container) -> None:
    writer = Writer(database).start()
    writer.wait_for_rows(300)

    database.kill()

    database.wait(timeout=30)
    writer.stop()
    committed = writer.committed
    restart(database)
    result = verify(database, committed)
    assert result.count == len(committed)
    startup = log_since_start(database)
    assert "database system was not properly shut down" in startup
    assert recovery_problems(startup) == []
    damaged = startup + "\n2026-01-01 00:00:00 UTC [9] PANIC:  could not locate a valid checkpoint"
    assert len(recovery_problems(damaged)) == 1
