"""The one runner of every zfs/zpool/mount/umount/sync command: bounded in time, always.

A command on a hung filesystem can block for ever (seen: ``sync -f`` for 25
minutes), and a worker thread waiting on it is lost to every other volume.
So each command runs in a process group of its own under a limit by kind
(``DEFAULT_TIMEOUTS``): a quick read, a change, a mount; a send or receive is bounded
by its own progress (no bytes moved for its limit), not by its length. On
expiry the whole group is killed; a process that does not die even then (it
sleeps in the kernel) is left to a reaper thread and the caller gets
``CommandTimeout`` at once: nothing here waits for ever, and no pipe is read
after the kill (a surviving grandchild may hold it open).

What runs now, and since when, is listed by ``running()``: the agent reports
commands that run too long as stuck (``agent.service``). Each command's duration is
logged at debug. ``FERRY_ZFS_TIMEOUTS=read=5,mount=3`` changes the limits;
``FERRY_FAILPOINTS=hang:<words>`` makes matching commands hang (tests).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum

from agent import failpoints
from agent.zfs.exceptions import CommandTimeout

log = logging.getLogger(__name__)


class Kind(StrEnum):
    READ = "read"
    CHANGE = "change"
    MOUNT = "mount"
    STREAM = "stream"


DEFAULT_TIMEOUTS = {Kind.READ: 30.0, Kind.CHANGE: 60.0, Kind.MOUNT: 60.0, Kind.STREAM: 60.0}
# After SIGKILL, how long the runner waits for the process to be gone before leaving it.
KILL_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.5
# What a ``hang:`` failpoint runs instead: never ends while the agent lives, and ends with it
# (a left-over hang would outlive every test that provoked it).
HANG_ARGV = ("sh", "-c", 'while kill -0 "$PPID" 2>/dev/null; do sleep 0.2; done')
# A stream whose progress nobody measures (no probe given, not a file) gets a wall clock.
STREAM_UNWATCHED_SECONDS = 3600.0

_READS = {"get", "list", "holds", "status"}
_STREAMS = {"send", "receive", "recv"}
_MOUNTS = {"mount", "unmount", "umount"}

Probe = Callable[[], int]
stream_progress: ContextVar[Probe | None] = ContextVar("stream_progress", default=None)
stop_requested: ContextVar[threading.Event | None] = ContextVar("stop_requested", default=None)


def limits() -> dict[Kind, float]:
    """The limits, with ``FERRY_ZFS_TIMEOUTS`` (``kind=seconds,...``) applied; ValueError
    saying how to write it when it is wrong."""
    found = dict(DEFAULT_TIMEOUTS)
    for item in filter(None, os.environ.get("FERRY_ZFS_TIMEOUTS", "").split(",")):
        kind, _, seconds = item.partition("=")
        try:
            which, limit = Kind(kind.strip()), float(seconds)
        except ValueError:
            limit = 0.0
        if limit <= 0:
            raise ValueError(
                f"FERRY_ZFS_TIMEOUTS item {item!r}: use KIND=SECONDS (SECONDS > 0) with KIND "
                f"one of {', '.join(Kind)}"
            )
        found[which] = limit
    return found


def kind_of(argv: Sequence[str]) -> Kind:
    """What a command does, which sets its limit."""
    program = os.path.basename(argv[0])
    verb = argv[1] if len(argv) > 1 else ""
    if program in ("mount", "umount", "sync"):
        return Kind.MOUNT
    if len(argv) <= 2 or verb in _READS or verb == "upgrade" or "-nvP" in argv:
        return Kind.READ  # usage texts, property reads, listings, send size estimates
    if verb in _STREAMS:
        return Kind.STREAM
    if verb in _MOUNTS:
        return Kind.MOUNT
    return Kind.CHANGE


@dataclass(frozen=True)
class Running:
    """One command in flight: what, for which dataset, since when (wall clock), its limit."""

    argv: tuple[str, ...]
    subject: str | None
    kind: Kind
    started_at: float
    limit: float

    def describe(self, now: float | None = None) -> str:
        """```zfs send p/ferry/v@s` running since 2026-01-02 10:00:00 UTC (42 s, limit 60 s)``."""
        age = (now or time.time()) - self.started_at
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return (
            f"`{' '.join(self.argv)}` running since {since} ({age:.0f} s, limit {self.limit:.0f} s)"
        )


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


_lock = threading.Lock()
_running: dict[int, Running] = {}
_ids = itertools.count()


def running() -> list[Running]:
    """Every command in flight now, killed ones still in the kernel included, oldest first."""
    with _lock:
        return sorted(_running.values(), key=lambda r: r.started_at)


@contextlib.contextmanager
def watching(probe: Probe, stop: threading.Event | None = None) -> Iterator[None]:
    """Stream commands run inside measure their progress with ``probe`` (bytes moved so far),
    and are killed at once when ``stop`` is set (their caller gave up: a cancelled transfer
    must not wait for a hung command's limit)."""
    tokens = (stream_progress.set(probe), stop_requested.set(stop))
    try:
        yield
    finally:
        stream_progress.reset(tokens[0])
        stop_requested.reset(tokens[1])


def run(
    argv: Sequence[str],
    subject: str | None = None,
    *,
    stdin: int | None = None,
    stdout: int | None = subprocess.PIPE,
    timeout: float | None = None,
) -> Finished:
    """Run ``argv`` within its limit; CommandTimeout (the group killed) when it is exceeded.

    ``subject`` is the dataset, snapshot or path the command is about.
    ``stdout``/``stdin`` may be descriptors (a stream's socket or pipe).
    """
    command = tuple(argv)
    kind = kind_of(command)
    probe = _probe(kind, stdout if stdout != subprocess.PIPE else stdin)
    if timeout is not None:
        limit = timeout
    elif kind == Kind.STREAM and probe is None:
        limit = STREAM_UNWATCHED_SECONDS
    else:
        limit = limits()[kind]
    real = HANG_ARGV if failpoints.hangs(command) else command
    started = time.monotonic()
    process = subprocess.Popen(
        real,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    key = next(_ids)
    with _lock:
        _running[key] = Running(command, subject, kind, time.time(), limit)
    left_running = False
    try:
        out, err = _wait(process, limit, probe, stop_requested.get())
    except _Expired as expired:
        left_running = not _kill(process)
        message = f"`{' '.join(command)}` {expired} and was killed"
        if left_running:
            threading.Thread(target=_reap, args=(process, key), daemon=True).start()
            message += (
                "; it did not exit after SIGKILL (stuck in the kernel: the ZFS daemon or "
                "the pool is hung)"
            )
        log.log(
            logging.ERROR if expired.timed_out else logging.WARNING,
            "command killed: argv=%s subject=%s kind=%s why=%s still_in_kernel=%s",
            " ".join(command),
            subject,
            kind,
            expired,
            left_running,
        )
        raise CommandTimeout(subject, f"{message}; {_advice(subject)}") from None
    finally:
        if not left_running:
            with _lock:
                _running.pop(key, None)
    log.debug(
        "command: argv=%s kind=%s seconds=%.3f rc=%d",
        " ".join(command),
        kind,
        time.monotonic() - started,
        process.returncode,
    )
    return Finished(process.returncode, out or "", err or "")


class _Expired(Exception):
    """The command must end; the text says why (``did not finish in 30 s``, ...), and whether
    it ran past its limit (else its caller gave up on it)."""

    def __init__(self, why: str, timed_out: bool) -> None:
        super().__init__(why)
        self.timed_out = timed_out


def _wait(
    process: subprocess.Popen[str],
    limit: float,
    probe: Probe | None,
    stop: threading.Event | None,
) -> tuple[str, str]:
    """Output of the finished process; _Expired once ``limit`` passed (without progress) or
    ``stop`` was set."""
    last_change = time.monotonic()
    seen = probe() if probe else 0
    while True:
        try:
            return process.communicate(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if probe is not None and (moved := probe()) != seen:
            seen, last_change = moved, now
        if now - last_change >= limit:
            what = "moved no data for" if probe is not None else "did not finish in"
            raise _Expired(f"{what} {limit:.0f} s", timed_out=True)
        if stop is not None and stop.is_set():
            raise _Expired("was stopped by the agent (its transfer was cancelled)", timed_out=False)


def _kill(process: subprocess.Popen[str]) -> bool:
    """SIGKILL the command's process group; True once the process is gone (within the grace)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
    try:
        process.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        return False
    return True


def _reap(process: subprocess.Popen[str], key: int) -> None:
    """Wait in the background for a killed command stuck in the kernel; listed until it exits."""
    since = time.monotonic()
    process.wait()
    with _lock:
        _running.pop(key, None)
    log.warning(
        "a killed command finally exited: argv=%s after=%.0fs",
        " ".join(str(a) for a in process.args),  # type: ignore[union-attr]
        time.monotonic() - since,
    )


def _probe(kind: Kind, fd: int | None) -> Probe | None:
    """How a stream command's progress is measured: the caller's probe, or a file's offset."""
    if kind != Kind.STREAM:
        return None
    given = stream_progress.get()
    if given is not None:
        return given
    if fd is not None and fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        return lambda: os.lseek(fd, 0, os.SEEK_CUR)
    return None


def _advice(subject: str | None) -> str:
    pool = subject.split("/")[0].split("@")[0] if subject and not subject.startswith("/") else ""
    where = f"`zpool status {pool}`" if pool else "`zpool status`"
    return (
        f"check {where} and the ZFS daemon (zfs-fuse: deploy/zfs-fuse-up.sh); "
        "Ferry retries the step"
    )
