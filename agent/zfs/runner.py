"""The one runner of every zfs/zpool/mount/umount/sync command and libzfs_core call: bounded.

A command on a hung filesystem can block for ever (seen: ``sync -f`` for 25
minutes), and a worker thread waiting on it is lost to every other volume.
So each command runs in a process group of its own under a limit by kind
(``DEFAULT_TIMEOUTS``): a quick read, a change, a mount; a send or receive is bounded
by its own progress (no bytes moved for its limit), not by its length. On
expiry the whole group is killed; a process that does not die even then (it
sleeps in the kernel) is left to a reaper thread and the caller gets
``CommandTimeout`` at once: nothing here waits for ever, and no pipe is read
after the kill (a surviving grandchild may hold it open).

The libzfs_core backend's calls are bounded by the same limits (``call``):
an ioctl cannot be interrupted, so each call runs in a thread of its own and
the caller waits for it up to the limit; past it the caller gets
``CommandTimeout`` at once, the thread is left to finish, and the call stays
listed by ``running()`` until it returns (logged when it does).

What runs now, and since when, is listed by ``running()``: the agent reports
commands that run too long as stuck (``agent.service``). Each command's duration is
logged at debug, and every finished command (a call, too) is reported to the
observers (``add_observer``) with its duration and ``Outcome``: the one place
where metrics of ZFS commands attach. ``FERRY_ZFS_TIMEOUTS=read=5,mount=3``
changes the limits; ``FERRY_FAILPOINTS=hang:<words>`` makes matching commands
(or calls: ``hang:lzc_send``) hang (tests).
"""

from __future__ import annotations

import contextlib
import functools
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
from typing import TypeVar, cast

from agent import failpoints
from agent.zfs.exceptions import CommandTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")
PIPE = subprocess.PIPE


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


class Outcome(StrEnum):
    """How a command ended, as observers are told."""

    OK = "ok"  # exit status 0, or the call returned
    FAILED = "failed"  # a non-zero exit status, or the call raised
    TIMED_OUT = "timed_out"  # past its limit: killed (a call: left to finish in its thread)
    STOPPED = "stopped"  # its caller gave up on it (a cancelled transfer)


Observer = Callable[[tuple[str, ...], float, Outcome], None]
"""Told of every finished command: its argv (a call: function name and subject), the
seconds until it ended or was given up, and how it ended."""

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
_observers: list[Observer] = []


def running() -> list[Running]:
    """Every command in flight now, killed ones still in the kernel included, oldest first."""
    with _lock:
        return sorted(_running.values(), key=lambda r: r.started_at)


def add_observer(observer: Observer) -> None:
    """Tell ``observer`` of every command and call that ends from now on (metrics attach here).

    It is called in the thread that ran the command and must return quickly; an
    observer that raises is logged and the command's own result stands."""
    _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    _observers.remove(observer)


def _report(command: tuple[str, ...], seconds: float, outcome: Outcome) -> None:
    for observer in tuple(_observers):
        try:
            observer(command, seconds, outcome)
        except Exception:
            log.exception("command observer failed: observer=%r argv=%s", observer, command)


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


def _limit(kind: Kind, probe: Probe | None, timeout: float | None) -> float:
    if timeout is not None:
        return timeout
    if kind == Kind.STREAM and probe is None:
        return STREAM_UNWATCHED_SECONDS
    return limits()[kind]


def _listed(command: tuple[str, ...], subject: str | None, kind: Kind, limit: float) -> int:
    key = next(_ids)
    with _lock:
        _running[key] = Running(command, subject, kind, time.time(), limit)
    return key


def _unlisted(key: int) -> None:
    with _lock:
        _running.pop(key, None)


def run(
    argv: Sequence[str],
    subject: str | None = None,
    *,
    stdin: int | None = None,
    stdout: int | None = PIPE,
    timeout: float | None = None,
) -> Finished:
    """Run ``argv`` within its limit; CommandTimeout (the group killed) when it is exceeded.

    ``subject`` is the dataset, snapshot or path the command is about.
    ``stdout``/``stdin`` may be descriptors (a stream's socket or pipe).
    """
    command = tuple(argv)
    kind = kind_of(command)
    probe = _probe(kind, stdout if stdout != PIPE else stdin)
    limit = _limit(kind, probe, timeout)
    real = HANG_ARGV if failpoints.hangs(command) else command
    started = time.monotonic()
    process = subprocess.Popen(
        real,
        stdin=stdin,
        stdout=stdout,
        stderr=PIPE,
        text=True,
        start_new_session=True,
    )
    key = _listed(command, subject, kind, limit)
    output: list[tuple[str, str]] = []

    def finished(wait: float) -> bool:
        try:
            output.append(process.communicate(timeout=wait))
        except subprocess.TimeoutExpired:
            return False
        return True

    left_running = False
    try:
        _wait(finished, limit, probe, stop_requested.get())
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
        _report(command, time.monotonic() - started, expired.outcome)
        raise CommandTimeout(subject, f"{message}; {_advice(subject)}") from None
    finally:
        if not left_running:
            _unlisted(key)
    seconds = time.monotonic() - started
    out, err = output[0]
    log.debug(
        "command: argv=%s kind=%s seconds=%.3f rc=%d",
        " ".join(command),
        kind,
        seconds,
        process.returncode,
    )
    _report(command, seconds, Outcome.OK if process.returncode == 0 else Outcome.FAILED)
    return Finished(process.returncode, out or "", err or "")


def check(
    argv: Sequence[str],
    subject: str | None = None,
    *,
    failure: Callable[[str], Exception],
    stdin: int | None = None,
    stdout: int | None = PIPE,
) -> str:
    """``run``, then ``failure(stderr)`` raised when the command exits non-zero; its stdout."""
    result = run(argv, subject, stdin=stdin, stdout=stdout)
    if result.returncode != 0:
        raise failure(result.stderr)
    return result.stdout


def call(
    command: Sequence[str],
    subject: str | None,
    kind: Kind,
    work: Callable[[], T],
    *,
    fd: int | None = None,
) -> T:
    """``work()`` (a libzfs_core call, named by ``command``) within the limit of ``kind``.

    An ioctl cannot be interrupted, so ``work`` runs in a thread of its own and
    the caller waits for it. Past the limit (or when the transfer's stop is set)
    the caller gets CommandTimeout at once and the thread is left to finish:
    listed by ``running()`` until it returns, and logged when it does. ``fd`` is
    a stream's descriptor: a regular file's offset measures its progress.
    """
    command = tuple(command)
    probe = _probe(kind, fd)
    limit = _limit(kind, probe, None)
    if failpoints.hangs(command):
        work = functools.partial(_hang_while_armed, command)  # type: ignore[assignment]
    started = time.monotonic()
    key = _listed(command, subject, kind, limit)
    thread = _CallThread(command, work, key)
    thread.start()
    try:
        _wait(thread.done.wait, limit, probe, stop_requested.get())
    except _Expired as expired:
        thread.abandon()
        log.log(
            logging.ERROR if expired.timed_out else logging.WARNING,
            "libzfs_core call abandoned: call=%s subject=%s kind=%s why=%s; it goes on in "
            "its thread until the kernel returns (an ioctl cannot be interrupted)",
            " ".join(command),
            subject,
            kind,
            expired,
        )
        _report(command, time.monotonic() - started, expired.outcome)
        raise CommandTimeout(
            subject,
            f"`{' '.join(command)}` {expired}; the libzfs_core call cannot be interrupted and "
            f"goes on in the background (the kernel or the pool is hung); {_advice(subject)}",
        ) from None
    _unlisted(key)
    seconds = time.monotonic() - started
    log.debug("call: call=%s kind=%s seconds=%.3f", " ".join(command), kind, seconds)
    _report(command, seconds, Outcome.OK if thread.error is None else Outcome.FAILED)
    if thread.error is not None:
        raise thread.error
    return cast(T, thread.value)


class _CallThread(threading.Thread):
    """Runs one libzfs_core call; keeps its result for the caller, or its listing until it
    returns when the caller gave up on it."""

    def __init__(self, command: tuple[str, ...], work: Callable[[], object], key: int) -> None:
        super().__init__(name=f"zfs-call {' '.join(command)}", daemon=True)
        self.command = command
        self.work = work
        self.key = key
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None
        self._abandoned_at: float | None = None

    def run(self) -> None:
        try:
            self.value = self.work()
        except BaseException as error:
            self.error = error
        with _lock:
            self.done.set()
            abandoned_at = self._abandoned_at
        if abandoned_at is not None:
            _unlisted(self.key)
            log.warning(
                "an abandoned libzfs_core call finally returned: call=%s after=%.0fs error=%s",
                " ".join(self.command),
                time.monotonic() - abandoned_at,
                self.error,
            )

    def abandon(self) -> None:
        """The caller gives up: the listing goes once the call returns (now, if it just did)."""
        with _lock:
            self._abandoned_at = time.monotonic()
            returned = self.done.is_set()
        if returned:
            _unlisted(self.key)


def _hang_while_armed(command: tuple[str, ...]) -> None:
    """What a ``hang:`` failpoint runs instead of a call: it returns once disarmed."""
    while failpoints.hangs(command):
        time.sleep(0.2)


class _Expired(Exception):
    """The command must end; the text says why (``did not finish in 30 s``, ...), and whether
    it ran past its limit (else its caller gave up on it)."""

    def __init__(self, why: str, timed_out: bool) -> None:
        super().__init__(why)
        self.timed_out = timed_out

    @property
    def outcome(self) -> Outcome:
        return Outcome.TIMED_OUT if self.timed_out else Outcome.STOPPED


def _wait(
    finished: Callable[[float], bool],
    limit: float,
    probe: Probe | None,
    stop: threading.Event | None,
) -> None:
    """Return once ``finished(seconds)`` (which waits up to ``seconds``) says so; _Expired once
    ``limit`` passed (without progress) or ``stop`` was set."""
    last_change = time.monotonic()
    seen = probe() if probe else 0
    while not finished(POLL_SECONDS):
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
    _unlisted(key)
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
