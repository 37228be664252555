"""The command limits an operator sets: applied by kind, refused clearly when mistyped."""

from __future__ import annotations

import pytest

from agent.zfs.runner import DEFAULT_TIMEOUTS, Kind, kind_of, limits


def test_limits_set_in_the_environment_replace_the_defaults_of_their_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", "read=5, stream=120")
    assert limits() == {**DEFAULT_TIMEOUTS, Kind.READ: 5.0, Kind.STREAM: 120.0}


@pytest.mark.parametrize("value", ["mount=soon", "write=5", "read=0", "read"])
def test_a_mistyped_limit_is_refused_with_how_to_write_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", value)
    with pytest.raises(ValueError, match=r"use KIND=SECONDS .* one of read, change, mount"):
        limits()


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["zfs", "get", "-Hp", "all", "p/ferry/v"], Kind.READ),
        (["zfs", "send", "-nvP", "p/ferry/v@s"], Kind.READ),
        (["zfs", "send"], Kind.READ),
        (["zfs", "send", "-i", "p/ferry/v@a", "p/ferry/v@b"], Kind.STREAM),
        (["zfs", "receive", "-u", "p/ferry/v@b"], Kind.STREAM),
        (["zfs", "destroy", "p/ferry/v"], Kind.CHANGE),
        (["sync", "-f", "/mnt/v"], Kind.MOUNT),
        (["mount", "-i", "-o", "remount,ro", "/mnt/v"], Kind.MOUNT),
        (["zfs", "unmount", "p/ferry/v"], Kind.MOUNT),
    ],
)
def test_each_command_gets_the_limit_of_what_it_does(argv: list[str], kind: Kind) -> None:
    """A send's size estimate is a quick read; only a real stream is bounded by progress."""
    assert kind_of(argv) == kind
