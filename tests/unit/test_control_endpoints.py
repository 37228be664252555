"""How etcd endpoints given to --etcd / FERRY_ETCD become the address gRPC dials."""

from __future__ import annotations

import socket

import pytest

from ferry.cluster.keyspace import etcd_target


@pytest.mark.parametrize(
    ("endpoints", "target"),
    [
        (["127.0.0.1:2379"], ("127.0.0.1", 2379)),
        (["etcd.cluster.local:2379"], ("etcd.cluster.local", 2379)),
        (["http://10.0.0.1:2379"], ("10.0.0.1", 2379)),
        (["https://10.0.0.1:2379"], ("10.0.0.1", 2379)),
        (["10.0.0.1:2379", "10.0.0.2:2380"], ("ipv4:10.0.0.1:2379,10.0.0.2", 2380)),
        (
            ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"],
            ("ipv4:10.0.0.1:2379,10.0.0.2:2379,10.0.0.3", 2379),
        ),
        (["localhost:2379", "10.0.0.2:2379"], ("ipv4:127.0.0.1:2379,10.0.0.2", 2379)),
        (["10.0.0.1:2379", "10.0.0.1:2379"], ("ipv4:10.0.0.1", 2379)),
    ],
)
def test_every_member_given_is_dialled(endpoints: list[str], target: tuple[str, int]) -> None:
    assert etcd_target(endpoints) == target


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ([], "no etcd endpoint given"),
        (["10.0.0.1"], "needs a port"),
        (["10.0.0.1:abc"], "needs a port"),
    ],
)
def test_endpoints_that_cannot_work_are_refused_with_how_to_write_them(
    endpoints: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        etcd_target(endpoints)


def test_a_member_name_that_does_not_resolve_is_refused_with_what_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_such_name(*_args: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(ValueError, match=r"etcd-b:2379: its name does not resolve .* DNS"):
        etcd_target(["10.0.0.1:2379", "etcd-b:2379"])
