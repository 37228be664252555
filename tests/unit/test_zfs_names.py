"""ZFS name rules: bad names are refused with NameInvalid/NameTooLong before any command runs."""

from __future__ import annotations

import subprocess

import pytest

from agent import zfs
from agent.zfs import names
from agent.zfs.exceptions import NameInvalid, NameTooLong
from agent.zfs.volumes import PoolRoot


@pytest.fixture(autouse=True)
def no_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any zfs command started by these tests fails the test: validation must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a command ran before the name was checked: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize(
    "name",
    [
        "tank",
        "tank/ferry/db-1",
        b"tank/ferry/db_1.v2:x",
        "tank/with space",
        "tank/a@ferry-3-17",
        "tank/a#mark",
    ],
)
def test_valid_names_pass_and_come_back_as_bytes(name: str | bytes) -> None:
    expected = name.encode() if isinstance(name, str) else name
    assert names.validate(name) == expected


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("tank//a", "empty component"),
        ("tank/a/", "trailing slash"),
        ("/tank/a", "leading slash"),
        ("tank/./a", "dot component"),
        ("tank/../etc", "dot-dot component"),
        ("tank/..", "dot-dot at the end"),
        ("tank/a@", "empty snapshot part"),
        ("tank/a#", "empty bookmark part"),
        ("tank/a@s@t", "two @"),
        ("tank/a@s#m", "@ and #"),
        ("tank/a@s/b", "slash inside the snapshot part"),
        ("tank/a%b", "% is reserved"),
        ("tank/a\0b", "NUL"),
        ("-tank/a", "leading dash reads as an option"),
        ("tank/a*b", "wildcard"),
        ("tank/a\nb", "newline"),
        ("tank/é", "non-ASCII"),
        ("tank/a;rm", "shell metacharacter"),
        ("1tank/a", "pool name starts with a digit"),
        (".tank/a", "pool name starts with a dot"),
        ("@snap", "no dataset before @"),
        ("tank/a@..", "dot-dot snapshot"),
        ("tank/a\tb", "tab"),
    ],
)
def test_invalid_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(NameInvalid):
        names.validate(name)


def test_255_bytes_is_the_limit() -> None:
    longest = "tank/" + "a" * 250
    assert names.validate(longest) == longest.encode()
    with pytest.raises(NameTooLong) as raised:
        names.validate(longest + "a")
    assert raised.value.errno == 36


def test_length_counts_bytes_not_characters() -> None:
    with pytest.raises((NameTooLong, NameInvalid)):
        names.validate("tank/" + "é" * 130)


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("dataset", "tank/a", "tank/a@s"),
        ("snapshot", "tank/a@s", "tank/a"),
        ("bookmark", "tank/a#m", "tank/a@s"),
    ],
)
def test_kind_is_enforced(kind: str, good: str, bad: str) -> None:
    assert names.validate(good, kind) == good.encode()
    with pytest.raises(NameInvalid):
        names.validate(bad, kind)


@pytest.mark.parametrize(
    "name", ["tank/ferry/db", "tank/ferry/db@s1", "tank/ferry", "tank/ferry/a/b"]
)
def test_names_under_the_root_pass(name: str) -> None:
    assert names.validate_under(name, "tank/ferry") == name.encode()


@pytest.mark.parametrize(
    "name",
    ["tank/ferryx/db", "tank/other", "tank", "tank/ferry-aside/db", "other/ferry/db"],
)
def test_names_outside_the_root_are_refused(name: str) -> None:
    with pytest.raises(NameInvalid, match="outside"):
        names.validate_under(name, "tank/ferry")


@pytest.mark.parametrize("volume", ["db", "pg-15_data.v2", "A1"])
def test_volume_names_follow_docker_rules(volume: str) -> None:
    assert names.validate_volume_name(volume) == volume


@pytest.mark.parametrize(
    "volume", ["", "a/b", "..", ".hidden", "-x", "_x", "a@b", "a b", "a:b", "x" * 65]
)
def test_bad_volume_names_are_refused(volume: str) -> None:
    with pytest.raises(NameInvalid):
        names.validate_volume_name(volume)


@pytest.mark.parametrize(
    "call",
    [
        lambda: zfs.lzc_create("tank/../x"),
        lambda: zfs.lzc_snapshot(["tank/a@s", "tank/b"]),
        lambda: zfs.lzc_destroy_snaps(["tank/a@s%"], defer=False),
        lambda: zfs.lzc_destroy("-rf"),
        lambda: zfs.lzc_exists("tank/a\0"),
        lambda: zfs.lzc_send("tank/a", None, 1),
        lambda: zfs.lzc_receive("tank/a@s@t", 0),
        lambda: zfs.lzc_hold({"tank/a": "tag"}),
        lambda: zfs.lzc_release({"tank//a@s": ["tag"]}),
        lambda: zfs.lzc_rollback("tank/a@s"),
        lambda: zfs.lzc_rename("tank/a", "tank/b/../c"),
        lambda: zfs.lzc_clone("tank/c", "tank/a"),
        lambda: zfs.lzc_promote("tank/a%"),
        lambda: zfs.lzc_get_props("tank/*"),
        lambda: zfs.lzc_set_prop("-o", "readonly", "on"),
        lambda: zfs.lzc_list_snaps("tank/a@s"),
        lambda: zfs.zfs_mount("tank/."),
    ],
)
def test_every_operation_checks_names_before_running_anything(call: object) -> None:
    assert callable(call)
    with pytest.raises(NameInvalid):
        call()


def test_volume_dataset_is_under_the_pool_root() -> None:
    root = PoolRoot("tank")
    assert root.dataset("db") == b"tank/ferry/db"
    for bad in ("../x", "a/b", "db@s", ""):
        with pytest.raises(NameInvalid):
            root.dataset(bad)
