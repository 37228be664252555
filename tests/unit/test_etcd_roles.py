"""etcd's role table: which keys each role may write, and a reason for every shared one."""

from __future__ import annotations

import pytest
from aetcd.utils import prefix_range_end

from control import etcd_auth
from ferry.cluster.keyspace import KINDS, KeyRange, grant_range


def covers(keys: KeyRange, key: bytes) -> bool:
    if not keys.range_end:
        return key == keys.key
    return keys.key <= key < keys.range_end


def writable(prefix: str, role: str, key: str) -> bool:
    _, wanted = etcd_auth.roles(prefix, ["host1", "host10"])[role]
    return any(t == etcd_auth.WRITE and covers(r, key.encode()) for t, r in wanted)


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("/ferry/v1/nodes/host1", True),
        ("/ferry/v1/nodes/host10", False),
        ("/ferry/v1/nodes/host1x", False),
        ("/ferry/v1/state/host1/vol", True),
        ("/ferry/v1/state/host10/vol", False),
        ("/ferry/v1/owners/vol", True),
        ("/other/v1/owners/vol", False),
        ("/ferry/v1/volumes/vol", False),
    ],
)
def test_a_node_role_writes_its_own_keys_and_not_a_namesake_prefixs(
    key: str, allowed: bool
) -> None:
    assert writable("/ferry/v1", etcd_auth.node_role("host1"), key) is allowed


def test_control_writes_volumes_moves_drop_requests_and_purged_owners_only() -> None:
    role = etcd_auth.CONTROL_ROLE
    written = {kind for kind in KINDS if writable("/ferry/v1", role, f"/ferry/v1/{kind}/x/y")}
    assert written == {"volumes", "moves", "drops", "owners"}


@pytest.mark.parametrize("kind", ["asides", "drops"])
def test_a_node_reports_and_closes_only_its_own_copies_kept_aside(kind: str) -> None:
    role = etcd_auth.node_role("host1")
    assert writable("/ferry/v1", role, f"/ferry/v1/{kind}/host1/db-e2-20260101T000000Z")
    assert not writable("/ferry/v1", role, f"/ferry/v1/{kind}/host2/db-e2-20260101T000000Z")
    assert not writable("/ferry/v1", role, f"/ferry/v1/{kind}/host10/db")


def test_every_role_reads_the_whole_prefix_and_nothing_else() -> None:
    for _, wanted in etcd_auth.roles("/ferry/v1/", ["host1"]).values():
        reads = {r for t, r in wanted if t == etcd_auth.READ}
        assert reads == {KeyRange(b"/ferry/v1/", prefix_range_end(b"/ferry/v1/"))}


def test_every_node_write_beyond_its_own_keys_says_why() -> None:
    for right in etcd_auth.NODE_WRITES:
        assert right.own or right.shared, f"node write of {right.kind}/ without a reason"


def test_only_per_node_kinds_can_be_granted_per_node() -> None:
    with pytest.raises(ValueError, match="cannot be granted per node"):
        grant_range("/ferry/v1", "mounts", "host1")


@pytest.mark.parametrize("name", ["root", "control"])
def test_a_node_named_like_an_etcd_user_is_refused(name: str) -> None:
    with pytest.raises(etcd_auth.BootstrapError, match="cannot be named"):
        etcd_auth.roles("/ferry/v1", [name])
