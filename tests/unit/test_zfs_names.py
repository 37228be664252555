"""ZFS name rules: a bad name is rejected before any ``zfs`` command runs."""

from __future__ import annotations

import subprocess

import pytest

from agent import zfs
from agent.zfs import cli
from agent.zfs.exceptions import NameInvalid, NameTooLong
from agent.zfs.names import (
    validate,
    validate_dataset,
    validate_snapshot,
    validate_under,
    validate_volume_name,
)

GOOD = [
    b"tank",
    b"tank/ferry/pg-data_1.v2:x",
    "tank/with space",
    b"tank/a@snap",
    b"tank/a#mark",
    "tank/a@ferry-2024-01-01T00:00:00",
]

BAD = {
    "empty": b"",
    "nul": b"tank/a\0b",
    "leading dash": b"-tank/a",
    "pool name starts with a digit": b"1tank/a",
    "pool name starts with a dot": b".tank/a",
    "empty component": b"tank//a",
    "trailing slash": b"tank/a/",
    "leading slash": b"/tank/a",
    "dot component": b"tank/./a",
    "dotdot component": b"tank/../etc",
    "dotdot snapshot": b"tank/a@..",
    "percent": b"tank/a%tmp",
    "two at": b"tank/a@b@c",
    "at and hash": b"tank/a@b#c",
    "slash in snapshot part": b"tank/a@b/c",
    "empty snapshot part": b"tank/a@",
    "empty dataset before at": b"@snap",
    "empty bookmark part": b"tank/a#",
    "shell characters": b"tank/a;rm -rf",
    "non-ascii": "tank/caf\u00e9",
    "newline": b"tank/a\nb",
    "tab": b"tank/a\tb",
}


@pytest.mark.parametrize("name", GOOD)
def test_valid_names_pass_and_come_back_as_bytes(name: bytes | str) -> None:
    result = validate(name)
    assert isinstance(result, bytes)
    assert result == (name.encode() if isinstance(name, str) else name)


@pytest.mark.parametrize("name", list(BAD.values()), ids=list(BAD))
def test_bad_names_are_rejected(name: bytes | str) -> None:
    with pytest.raises(NameInvalid):
        validate(name)


def test_255_bytes_is_the_limit() -> None:
    longest = b"tank/" + b"a" * 250
    assert validate(longest) == longest
    with pytest.raises(NameTooLong) as raised:
        validate(longest + b"a")
    assert raised.value.errno == 36


def test_limit_counts_bytes_not_characters() -> None:
    with pytest.raises(NameTooLong):
        validate("tank/" + "\u00e9" * 126)


def test_kind_is_enforced() -> None:
    with pytest.raises(NameInvalid):
        validate_dataset(b"tank/a@snap")
    with pytest.raises(NameInvalid):
        validate_snapshot(b"tank/a")
    with pytest.raises(NameInvalid):
        validate_snapshot(b"tank/a#mark")
    assert validate_snapshot("tank/a@s") == b"tank/a@s"


@pytest.mark.parametrize(
    "name",
    [b"tank/ferry", b"tank/ferry/vol", b"tank/ferry/vol@s", b"tank/ferry/a/b#m"],
)
def test_names_under_the_root_pass(name: bytes) -> None:
    assert validate_under(name, b"tank/ferry") == name


@pytest.mark.parametrize(
    "name",
    [b"tank", b"tank/ferry-aside/vol", b"tank/ferryx", b"other/ferry/vol", b"tank/ferry/../x"],
)
def test_names_outside_the_root_are_rejected(name: bytes) -> None:
    with pytest.raises(NameInvalid):
        validate_under(name, b"tank/ferry")


@pytest.mark.parametrize("volume", ["pg", "pg-data_1.v2", "A" * 64])
def test_docker_volume_names_pass(volume: str) -> None:
    assert validate_volume_name(volume) == volume


@pytest.mark.parametrize(
    "volume", ["", "a/b", "..", ".hidden", "-x", "a b", "A" * 65, "a@b", "a%b", "caf\u00e9"]
)
def test_bad_volume_names_are_rejected(volume: str) -> None:
    with pytest.raises(NameInvalid):
        validate_volume_name(volume)


CALLS = [
    lambda n: zfs.lzc_create(n),
    lambda n: zfs.lzc_destroy(n),
    lambda n: zfs.lzc_exists(n),
    lambda n: zfs.lzc_snapshot([n + b"@s"]),
    lambda n: zfs.lzc_destroy_snaps([n + b"@s"], defer=False),
    lambda n: zfs.lzc_send(n + b"@s", None, 1),
    lambda n: zfs.lzc_receive(n + b"@s", 0),
    lambda n: zfs.lzc_rename(n, b"tank/x"),
    lambda n: zfs.lzc_rename(b"tank/x", n),
    lambda n: zfs.lzc_clone(n, b"tank/a@s"),
    lambda n: zfs.lzc_promote(n),
    lambda n: zfs.lzc_rollback(n),
    lambda n: zfs.lzc_hold({n + b"@s": "t"}),
    lambda n: zfs.lzc_get_props(n),
    lambda n: zfs.lzc_set_prop(n, "ferry:x", "1"),
    lambda n: zfs.lzc_list_snaps(n),
    lambda n: zfs.zfs_mount(n),
]


@pytest.mark.parametrize("call", CALLS, ids=range(len(CALLS)))
@pytest.mark.parametrize("name", [b"tank/../etc", b"-o", b"tank/a%b", b"t/" + b"x" * 300])
def test_no_command_runs_for_a_bad_name(
    monkeypatch: pytest.MonkeyPatch, call: object, name: bytes
) -> None:
    ran: list[object] = []

    def record(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(cli.subprocess, "run", record)
    with pytest.raises((NameInvalid, NameTooLong)):
        call(name)  # type: ignore[operator]
    assert ran == []
