"""A PostgreSQL workload for migration tests: a writer that records only what committed.

Everything runs through ``docker exec`` + ``psql`` inside the ``ferry/postgres:15``
container, so containers can run with ``--network none``. The writer holds one
psql session (a real client connection) and sends one ``INSERT ... RETURNING``
per transaction; an id is recorded only after psql printed it, which psql does
only once the server reported the autocommit transaction committed (with
``synchronous_commit`` on, the default, that means the WAL is on disk). The
writer stops when asked or at the first error, e.g. when the database goes away.

Each row's payload is derived from its id, so the checksum of the committed rows
can be computed from the recorded ids alone and compared with what the database
computes over its own rows.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from docker.errors import APIError
from docker.models.containers import Container
from docker.utils.socket import next_frame_header, read_exactly

log = logging.getLogger(__name__)

TABLE = "ferry_rows"
PSQL = ("psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres")
STDOUT, STDERR = 1, 2


class PsqlError(RuntimeError):
    """psql failed; the message carries its stderr."""


class RowsMissing(AssertionError):
    """The database lacks rows the writer saw committed, or their contents differ."""


@dataclass(frozen=True)
class Verification:
    """What the database holds of the committed rows."""

    count: int
    checksum: str
    uncertain: int
    """Rows beyond the last recorded commit: a commit whose answer never arrived."""


def row_payload(row_id: int) -> str:
    return hashlib.sha256(f"ferry-row-{row_id}".encode()).hexdigest()


def expected_checksum(row_ids: Iterable[int]) -> str:
    """The checksum ``verify`` expects for these ids (the same formula as in SQL)."""
    joined = ",".join(f"{row_id}:{row_payload(row_id)}" for row_id in sorted(row_ids))
    return hashlib.md5(joined.encode()).hexdigest()


def psql(container: Container, sql: str) -> str:
    """Runs ``sql`` in the container's database and returns psql's unaligned output."""
    result = container.exec_run([*PSQL, "-c", sql], user="postgres", demux=True)
    stdout, stderr = result.output
    if result.exit_code != 0:
        message = (stderr or stdout or b"").decode(errors="replace").strip()
        raise PsqlError(f"psql in container {container.name} exited {result.exit_code}: {message}")
    return (stdout or b"").decode()


def psql_row(container: Container, sql: str, attempts: int = 3) -> str:
    """Runs a query that always answers one row, asking again when the answer is empty:
    Docker now and then loses a short exec's output (exit 0, no bytes; docker-py #2042,
    moby #27289), seen here under load right after a task started."""
    for attempt in range(1, attempts + 1):
        answer = psql(container, sql).strip()
        if answer:
            return answer
        log.warning("empty psql answer: container=%s attempt=%d", container.name, attempt)
    raise PsqlError(f"psql in container {container.name} answered nothing {attempts} times: {sql}")


def wait_ready(container: Container, timeout: float = 60.0) -> None:
    """Waits until PostgreSQL in ``container`` answers a query."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt yet"
    while time.monotonic() < deadline:
        container.reload()
        if container.status not in ("created", "running"):
            tail = _logs_text(container.logs(tail=20))
            raise PsqlError(
                f"container {container.name} is {container.status}, PostgreSQL will not answer; "
                f"its last log lines:\n{tail}"
            )
        try:
            if psql(container, "SELECT 1").strip() == "1":
                log.info("postgres ready: container=%s", container.name)
                return
        except (PsqlError, APIError) as error:
            last_error = str(error)
        time.sleep(0.2)
    raise TimeoutError(
        f"PostgreSQL in container {container.name} did not answer within {timeout:.0f}s; "
        f"last error: {last_error}; see `docker logs {container.name}`"
    )


def create_table(container: Container) -> None:
    psql(
        container,
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY, payload text NOT NULL)",
    )


def verify(container: Container, committed: Collection[int]) -> Verification:
    """Checks that every committed id is in the database with its payload.

    Raises ``RowsMissing`` naming the missing ids. Rows past the highest
    committed id are counted as ``uncertain`` and are not an error: the writer
    stopped before it heard whether that last commit happened.
    """
    highest = max(committed, default=0)
    output = psql_row(
        container,
        f"SELECT count(*), coalesce(md5(string_agg(id || ':' || payload, ',' ORDER BY id)), '') "
        f"FROM {TABLE} WHERE id <= {highest}",
    )
    count_text, checksum = output.split("|")
    count = int(count_text)
    expected = expected_checksum(committed) if committed else ""
    if count != len(committed) or checksum != expected:
        present = {int(line) for line in psql(container, f"SELECT id FROM {TABLE}").split()}
        missing = sorted(set(committed) - present)
        raise RowsMissing(
            f"container {container.name}: {len(committed)} committed rows expected, "
            f"{count} found, checksum {checksum!r} instead of {expected!r}; "
            f"missing ids ({len(missing)}): {missing[:20]}"
        )
    uncertain = int(psql_row(container, f"SELECT count(*) FROM {TABLE} WHERE id > {highest}"))
    return Verification(count=count, checksum=checksum, uncertain=uncertain)


_LOG_LINE = re.compile(r"\b(LOG|WARNING|ERROR|FATAL|PANIC):\s+(.*)$")
_END_OF_WAL = re.compile(r"invalid record length at [0-9A-F/]+: wanted \d+, got 0$")
_DAMAGE = ("could not", "invalid record", "invalid checkpoint", "invalid magic number", "corrupt")


def recovery_problems(log_text: str) -> list[str]:
    """The lines of a PostgreSQL log that show more than a normal crash recovery.

    "database system was not properly shut down" and the zero-length record
    that marks the end of WAL ("invalid record length ... got 0", at LOG level)
    are what every crash recovery prints; a PANIC, anything that "could not"
    be done, or any other invalid record or corruption is a problem.
    """
    problems = []
    for line in log_text.splitlines():
        match = _LOG_LINE.search(line)
        if match is None:
            continue
        level, message = match.groups()
        if level == "LOG" and _END_OF_WAL.search(message):
            continue
        if level == "PANIC" or any(word in message for word in _DAMAGE):
            problems.append(line.strip())
    return problems


def log_since_start(container: Container) -> str:
    """The container's log from its most recent start on (older runs left out)."""
    container.reload()
    started = container.attrs["State"]["StartedAt"]
    since = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp()
    return _logs_text(container.logs(since=since))


def _logs_text(logs: object) -> str:
    """``Container.logs`` returns bytes (its type stubs say str)."""
    return logs.decode(errors="replace") if isinstance(logs, bytes) else str(logs)


class SessionEnded(Exception):
    """The psql session stopped answering: an error, or the database went away."""


class _PsqlSession:
    """One long-lived psql inside the container, fed statements on stdin."""

    def __init__(self, container: Container, timeout: float) -> None:
        api = container.client.api
        exec_id = api.exec_create(container.id, list(PSQL), stdin=True, user="postgres")["Id"]
        self._stream: Any = api.exec_start(exec_id, socket=True)
        self._socket: socket.socket = self._stream._sock
        self._socket.settimeout(timeout)
        self._pending = b""

    def query_ids(self, sql: str, rows: int) -> list[int]:
        """Sends one statement and returns the ``rows`` ids it printed."""
        try:
            self._socket.sendall(sql.encode() + b"\n")
            lines: list[int] = []
            while len(lines) < rows:
                lines.append(int(self._read_line()))
            return lines
        except (OSError, ValueError) as error:
            raise SessionEnded(f"psql session failed: {error}") from error

    def _read_line(self) -> bytes:
        while b"\n" not in self._pending:
            stream, size = next_frame_header(self._stream)
            if size < 0:
                raise SessionEnded("psql session closed (the database or container went away)")
            data = read_exactly(self._stream, size)
            if stream == STDERR:
                raise SessionEnded(f"psql reported: {data.decode(errors='replace').strip()}")
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def close(self) -> None:
        try:
            self._socket.sendall(b"\\q\n")
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()


class Writer:
    """Inserts rows continuously in a thread and records each committed id.

    ``rows_per_commit`` rows go in one transaction; ``pause`` seconds pass
    between transactions. Ids start at ``first_id`` and grow by one.
    """

    def __init__(
        self,
        container: Container,
        first_id: int = 1,
        rows_per_commit: int = 1,
        pause: float = 0.0,
        statement_timeout: float = 30.0,
    ) -> None:
        self._container = container
        self._next_id = first_id
        self._rows_per_commit = rows_per_commit
        self._pause = pause
        self._statement_timeout = statement_timeout
        self._committed: list[int] = []
        self._acknowledged_at: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-writer", daemon=True)
        self.ended_because: str | None = None
        """Why the writer stopped on its own (None while running or when asked to stop)."""

    @property
    def committed(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._committed)

    def committed_before(self, when: float) -> tuple[int, ...]:
        """The ids whose commit psql reported before ``when`` (time.time()): each was
        committed, its WAL on disk, by then."""
        with self._lock:
            return tuple(
                row_id
                for row_id, at in zip(self._committed, self._acknowledged_at, strict=True)
                if at < when
            )

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> Writer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> tuple[int, ...]:
        """Asks the writer to stop after its current transaction; returns the committed ids."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"writer on {self._container.name} did not stop in {timeout:.0f}s")
        return self.committed

    def wait_for_rows(self, count: int, timeout: float = 60.0) -> None:
        """Waits until at least ``count`` rows committed; fails early if the writer ended."""
        deadline = time.monotonic() + timeout
        while len(self.committed) < count:
            if not self.running:
                raise RuntimeError(
                    f"writer ended after {len(self.committed)} rows: {self.ended_because}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.committed)} of {count} rows after {timeout}s")
            time.sleep(0.05)

    def _run(self) -> None:
        try:
            session = _PsqlSession(self._container, self._statement_timeout)
        except (APIError, OSError) as error:
            self.ended_because = f"could not start psql: {error}"
            log.warning("writer not started: container=%s error=%s", self._container.name, error)
            return
        try:
            while not self._stop.is_set():
                ids = range(self._next_id, self._next_id + self._rows_per_commit)
                values = ",".join(f"({row_id},'{row_payload(row_id)}')" for row_id in ids)
                sql = f"INSERT INTO {TABLE} (id, payload) VALUES {values} RETURNING id;"
                try:
                    returned = session.query_ids(sql, len(ids))
                except SessionEnded as ended:
                    self.ended_because = str(ended)
                    log.info(
                        "writer ended: container=%s committed=%d reason=%s",
                        self._container.name,
                        len(self._committed),
                        ended,
                    )
                    return
                if returned != list(ids):
                    self.ended_because = f"psql returned ids {returned}, expected {list(ids)}"
                    return
                acknowledged = time.time()
                with self._lock:
                    self._committed.extend(returned)
                    self._acknowledged_at.extend(acknowledged for _ in returned)
                self._next_id += len(ids)
                if self._pause:
                    self._stop.wait(self._pause)
        finally:
            session.close()
