"""The libzfs_core backend's calls are bounded by the runner's limits, like commands.

On a stand-in for the binding whose calls block until the test lets them
return, the way an ioctl on a hung pool does (this machine has no kernel
ZFS). The real binding is held to the same bound by the conformance suite
(``test_a_call_past_its_limit_raises_command_timeout_and_is_listed_until_it_ends``),
in the kernel-OpenZFS guest.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.zfs import exceptions as exc
from agent.zfs import lzc, runner

LIMIT = 1.0
# The limit and the runner's poll, on a busy machine.
BOUND = LIMIT + runner.POLL_SECONDS + 2.0


class DatasetNotFound(Exception):
    """Named like the binding's own class, which the backend turns into Ferry's."""

    errno = 2

    def __init__(self, name: bytes) -> None:
        super().__init__(name)
        self.name = name


class Binding:
    """``libzfs_core`` as far as these tests need it; each call waits for ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.returned = threading.Event()

    def lzc_exists(self, name: bytes) -> bool:
        self.release.wait(30)
        self.returned.set()
        return name.endswith(b"/here")

    def lzc_destroy(self, name: bytes) -> None:
        raise DatasetNotFound(name)

    def lzc_send(self, snapname: bytes, fromsnap: bytes | None, fd: int, flags: Any = None) -> None:
        """Writes a byte every 0.1 s until released: progress, however long it takes."""
        while not self.release.wait(0.1):
            os.write(fd, b"x")
        self.returned.set()

    def lzc_receive(self, snapname: bytes, fd: int, force: bool = False, **_: Any) -> None:
        """Reads nothing until released: a stalled stream."""
        self.release.wait(30)
        self.returned.set()


@pytest.fixture
def binding(monkeypatch: pytest.MonkeyPatch) -> Iterator[Binding]:
    made = Binding()
    module = types.ModuleType("libzfs_core")
    for name in ("lzc_exists", "lzc_destroy", "lzc_send", "lzc_receive"):
        setattr(module, name, getattr(made, name))
    monkeypatch.setitem(sys.modules, "libzfs_core", module)
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", f"read={LIMIT},change={LIMIT},stream={LIMIT}")
    yield made
    made.release.set()


@pytest.fixture
def observed() -> Iterator[list[tuple[tuple[str, ...], runner.Outcome]]]:
    seen: list[tuple[tuple[str, ...], runner.Outcome]] = []

    def observe(command: tuple[str, ...], seconds: float, outcome: runner.Outcome) -> None:
        seen.append((command, outcome))

    runner.add_observer(observe)
    yield seen
    runner.remove_observer(observe)


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_call_past_its_limit_raises_at_once_and_goes_on_in_its_thread(
    binding: Binding,
    observed: list[tuple[tuple[str, ...], runner.Outcome]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    exists = lzc.functions()["lzc_exists"]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(exc.CommandTimeout) as raised:
        exists("p/ferry/db")
    assert time.monotonic() - started < BOUND
    assert f"`lzc_exists p/ferry/db` did not finish in {LIMIT:.0f} s" in str(raised.value)
    assert "cannot be interrupted" in str(raised.value) and "zpool status p" in str(raised.value)
    assert raised.value.name == "p/ferry/db"
    assert not binding.returned.is_set(), "the call was left running, not waited for"
    assert [r.argv for r in runner.running()] == [("lzc_exists", "p/ferry/db")]
    assert "libzfs_core call abandoned: call=lzc_exists p/ferry/db" in caplog.text
    assert observed == [(("lzc_exists", "p/ferry/db"), runner.Outcome.TIMED_OUT)]

    binding.release.set()
    assert _eventually(lambda: runner.running() == [])
    assert _eventually(lambda: "an abandoned libzfs_core call finally returned" in caplog.text)


def test_a_call_within_its_limit_returns_its_result_and_raises_ferrys_exceptions(
    binding: Binding, observed: list[tuple[tuple[str, ...], runner.Outcome]]
) -> None:
    functions = lzc.functions()
    binding.release.set()
    assert functions["lzc_exists"](b"p/here") is True
    with pytest.raises(exc.DatasetNotFound):
        functions["lzc_destroy"]("p/gone")
    assert observed == [
        (("lzc_exists", "p/here"), runner.Outcome.OK),
        (("lzc_destroy", "p/gone"), runner.Outcome.FAILED),
    ]
    assert runner.running() == []


def test_a_stream_call_is_bounded_by_its_progress_not_its_length(
    binding: Binding, tmp_path: Path
) -> None:
    """A send that keeps writing outlives the limit; a receive that reads nothing does not."""
    functions = lzc.functions()
    threading.Timer(4 * LIMIT, binding.release.set).start()
    with (tmp_path / "stream").open("wb") as out:
        started = time.monotonic()
        functions["lzc_send"]("p/v@s1", None, out.fileno())
        assert time.monotonic() - started > 3 * LIMIT
    binding.release.clear()
    with (tmp_path / "stream").open("rb") as source, pytest.raises(exc.CommandTimeout) as stalled:
        functions["lzc_receive"]("p/v@s2", source.fileno())
    assert f"moved no data for {LIMIT:.0f} s" in str(stalled.value)


def test_a_stream_call_given_up_by_its_transfer_raises_at_once(
    binding: Binding, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled transfer does not wait for its stalled call's limit."""
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", "stream=60")
    stop = threading.Event()
    read_fd, write_fd = os.pipe()
    threading.Timer(0.2, stop.set).start()
    try:
        started = time.monotonic()
        with runner.watching(lambda: 0, stop), pytest.raises(exc.CommandTimeout) as stopped:
            lzc.functions()["lzc_receive"]("p/v@s1", read_fd)
        assert time.monotonic() - started < BOUND
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert "was stopped by the agent" in str(stopped.value)
