"""Every ZFS/mount command is bounded: a hung one is killed, reported, and waits for nothing.

Real zfs-fuse pools; a hung command is a real process that never ends
(a ``zfs`` on PATH that sleeps, or the ``hang:`` failpoint).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import zfs
from agent.transfer import data
from agent.transfer.data import DataListener
from agent.transfer.secure import stream_context
from agent.zfs import cli, runner
from agent.zfs.exceptions import CommandTimeout
from agent.zfs.volumes import PoolRoot
from ferry.security import ca
from ferry.security.tls import TlsFiles
from tests.support.pools import ScratchPool, create_in_use, scratch_pool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LIMIT = 1.0
# The limit, the kill's grace and the poll, on a busy 2-core machine.
BOUND = LIMIT + runner.KILL_GRACE_SECONDS + 5.0


@pytest.fixture(scope="module")
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("to") as made:
        yield made


@pytest.fixture
def hung_zfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A ``zfs`` first on PATH that hangs, and leaves a grandchild in a session of its own
    holding the command's stdout open (what a process stuck in the kernel does to a pipe)."""
    escaped = tmp_path / "escaped.pid"
    shim = tmp_path / "bin" / "zfs"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nsetsid sleep 300 &\necho $! > {escaped}\nexec sleep 300\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", f"read={LIMIT}")
    yield escaped
    if escaped.exists():
        os.kill(int(escaped.read_text()), signal.SIGKILL)


def test_a_hung_zfs_command_is_killed_within_its_limit_and_says_what_to_do(
    pool: ScratchPool, hung_zfs: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as raised:
        cli.lzc_exists(pool.name)
    took = time.monotonic() - started
    assert took < BOUND
    message = str(raised.value)
    assert f"zfs list -H -o name -t all {pool.name}" in message
    assert f"did not finish in {LIMIT:.0f} s" in message
    assert f"zpool status {pool.name}" in message
    assert runner.running() == []


def test_a_command_running_now_is_listed_with_its_subject_and_start(
    pool: ScratchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_FAILPOINTS", "hang:zfs get")
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", "read=3")
    seen: list[runner.Running] = []

    def watch() -> None:
        deadline = time.monotonic() + 3
        while not seen and time.monotonic() < deadline:
            seen.extend(runner.running())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(CommandTimeout):
        cli.pool_free_bytes(pool.name)
    watcher.join()
    assert [(r.subject, r.argv[:2]) for r in seen] == [(pool.name, ("zfs", "get"))]
    assert "running since" in seen[0].describe() and "limit 3 s" in seen[0].describe()


def test_a_hung_sync_in_a_freeze_is_bounded(
    pool: ScratchPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = PoolRoot(pool.name)
    root.ensure()
    create_in_use(root, "to-freeze", 16 << 20, "off", tmp_path / "to-freeze")
    root.mount("to-freeze", tmp_path / "to-freeze")
    try:
        monkeypatch.setenv("FERRY_FAILPOINTS", "hang:sync")
        monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", f"mount={LIMIT}")
        started = time.monotonic()
        with pytest.raises(CommandTimeout, match=r"`sync -f .*to-freeze` did not finish"):
            root.freeze("to-freeze")
        assert time.monotonic() - started < BOUND
        # Back to the normal limits: a slow guest may take over a second to remount.
        monkeypatch.delenv("FERRY_FAILPOINTS")
        monkeypatch.delenv("FERRY_ZFS_TIMEOUTS")
        root.thaw("to-freeze")
        (tmp_path / "to-freeze" / "after").write_text("writable again")
    finally:
        root.destroy_volume("to-freeze")


def test_a_stream_is_bounded_by_its_progress_not_by_its_length(
    pool: ScratchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send that keeps moving outlives the limit; one whose reader stops is killed."""
    dataset = pool.dataset("to-stream")
    cli.lzc_create(dataset)
    (pool.path("to-stream") / "data").write_bytes(os.urandom(4 << 20))
    snapshot = dataset + b"@s1"
    cli.lzc_snapshot([snapshot])
    # Generous: a loaded zfs-fuse may take a second before a stream's first byte.
    stall = 3.0
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", f"stream={stall}")
    try:
        slow = _send_read_by(snapshot, pause=0.5, stop_after=None)
        assert slow.seconds > 2 * stall and slow.received > 4 << 20 and slow.error is None
        stalled = _send_read_by(snapshot, pause=0.0, stop_after=1 << 20)
        assert isinstance(stalled.error, CommandTimeout)
        assert f"moved no data for {stall:.0f} s" in str(stalled.error)
    finally:
        cli.zfs_unmount(dataset)
        cli.lzc_destroy_snaps([snapshot], defer=False)
        cli.lzc_destroy(dataset)


class _Sent:
    def __init__(self) -> None:
        self.received = 0
        self.seconds = 0.0
        self.error: Exception | None = None


def _send_read_by(snapshot: bytes, pause: float, stop_after: int | None) -> _Sent:
    """``lzc_send`` into a pipe read 256 KiB per ``pause``; reading stops after ``stop_after``."""
    read_fd, write_fd = os.pipe()
    result = _Sent()

    def send() -> None:
        try:
            with runner.watching(lambda: result.received):
                cli.lzc_send(snapshot, None, write_fd)
        except Exception as error:
            result.error = error
        finally:
            os.close(write_fd)

    started = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    while stop_after is None or result.received < stop_after:
        piece = os.read(read_fd, 256 << 10)
        if not piece:
            break
        result.received += len(piece)
        time.sleep(pause)
    sender.join(BOUND + 3.0)
    os.close(read_fd)
    result.seconds = time.monotonic() - started
    assert not sender.is_alive()
    return result


async def test_a_cancelled_transfer_kills_its_hung_zfs_send_at_once(
    pool: ScratchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handoff past its deadline cancels its stream: the hung send must not hold it for the
    stream's limit (60 s), since the thaw waits for it."""
    monkeypatch.setenv("FERRY_FAILPOINTS", "hang:zfs send")
    listener = DataListener("127.0.0.1", 0, None)
    await listener.start()
    try:
        ticket = listener.expect("127.0.0.1", "to-send", encrypted=False)
        with await data.connect("127.0.0.1", listener.port, ticket.token) as sock:
            snapshot = pool.dataset("to-never") + b"@s1"
            sending = asyncio.create_task(
                data.pump(functools.partial(cli.lzc_send, snapshot, None), sock)
            )
            await _cancelled_while_hung(sending)
    finally:
        await listener.close()


async def _cancelled_while_hung(sending: asyncio.Task[None]) -> None:
    """Cancel ``sending`` while its ``zfs send`` hangs: it ends within the bound, and so does
    the command."""
    await asyncio.sleep(1)
    assert [r.argv[:2] for r in runner.running()] == [("zfs", "send")]
    started = time.monotonic()
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(sending, BOUND)
    assert time.monotonic() - started < BOUND
    assert runner.running() == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("to-pki")
    ca.init(directory)
    for node in ("to-recv", "to-send"):
        ca.issue(directory, "node", node, ips=("127.0.0.1",))
    return directory


def _stream_context(pki: Path, node: str, purpose: ssl.Purpose) -> ssl.SSLContext:
    files = TlsFiles(pki / "ca.crt", pki / f"{node}.crt", pki / f"{node}.key")
    return stream_context(files.ssl_context(purpose))


async def test_a_cancelled_encrypted_transfer_kills_its_hung_zfs_send_at_once(
    pool: ScratchPool, pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encrypted path relays ``zfs send`` through a socket pair: giving up on it ends the
    command too, though the relay, not the command, holds the connection."""
    monkeypatch.setenv("FERRY_FAILPOINTS", "hang:zfs send")
    server_context = _stream_context(pki, "to-recv", ssl.Purpose.CLIENT_AUTH)
    listener = DataListener("127.0.0.1", 0, lambda: server_context)
    await listener.start()
    try:
        ticket = listener.expect("127.0.0.1", "to-send", encrypted=True)
        client = _stream_context(pki, "to-send", ssl.Purpose.SERVER_AUTH)
        sender = await data.connect_tls("127.0.0.1", listener.port, ticket.token, client, "to-recv")
        with sender.sock:
            snapshot = pool.dataset("to-never") + b"@s1"
            sending = asyncio.create_task(
                sender.send(functools.partial(cli.lzc_send, snapshot, None))
            )
            await _cancelled_while_hung(sending)
    finally:
        await listener.close()


def test_every_command_is_reported_to_the_observers_with_how_it_ended(
    pool: ScratchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook metrics attach to: one report per command, with its duration and outcome;
    an observer that raises changes no command's result."""
    seen: list[tuple[tuple[str, ...], float, runner.Outcome]] = []

    def observe(command: tuple[str, ...], seconds: float, outcome: runner.Outcome) -> None:
        seen.append((command, seconds, outcome))

    def broken(command: tuple[str, ...], seconds: float, outcome: runner.Outcome) -> None:
        raise RuntimeError("an observer's own bug")

    runner.add_observer(broken)
    runner.add_observer(observe)
    try:
        assert cli.lzc_exists(pool.name)
        assert not cli.lzc_exists(pool.name + "/missing")
        with pytest.raises(zfs.DatasetNotFound):
            cli.lzc_get_props(pool.name + "/missing")
        monkeypatch.setenv("FERRY_FAILPOINTS", "hang:zfs get")
        monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", f"read={LIMIT}")
        with pytest.raises(CommandTimeout):
            cli.pool_free_bytes(pool.name)
    finally:
        runner.remove_observer(observe)
        runner.remove_observer(broken)
    assert [(command[:2], outcome) for command, _, outcome in seen] == [
        (("zfs", "list"), runner.Outcome.OK),
        (("zfs", "list"), runner.Outcome.FAILED),
        (("zfs", "get"), runner.Outcome.FAILED),
        (("zfs", "get"), runner.Outcome.TIMED_OUT),
    ]
    assert seen[0][0][-1] == pool.name
    assert all(0 < seconds < BOUND for _, seconds, _ in seen)
    assert seen[-1][1] >= LIMIT
