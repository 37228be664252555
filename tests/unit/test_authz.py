"""The authorization table (ferry.security.authz): complete, equal to docs, and its limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from ferry.security import authz, ca
from ferry.security.authz import Caller, NoKind, caller_from_certificate, refusal
from protos.ferry.v1 import control_pb2, transfer_pb2

DOCS = Path(__file__).resolve().parents[2] / "docs" / "control.md"


def served_methods() -> set[str]:
    """Every RPC ferry-control and the agents serve, as gRPC names them."""
    services = [
        control_pb2.DESCRIPTOR.services_by_name["Control"],
        transfer_pb2.DESCRIPTOR.services_by_name["Transfer"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    return {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}


def test_every_served_rpc_has_exactly_one_rule() -> None:
    assert set(authz.RULES) == served_methods()


def test_docs_show_the_same_table_as_the_code() -> None:
    text = DOCS.read_text()
    table = text[text.index("<!-- authz-table") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[3:]:
        method, kinds, mutating, limit = (c.strip() for c in line.strip("|").split("|"))
        rows["/" + method.strip("`")] = (kinds, mutating, limit)
    assert rows == {
        method: (
            ", ".join(sorted(rule.kinds)),
            "yes" if rule.mutating else "no",
            rule.node_limit,
        )
        for method, rule in authz.RULES.items()
    }


def test_users_never_call_agents_and_nodes_only_what_their_plugin_and_creates_need() -> None:
    user, node = Caller("alice", authz.USER), Caller("host1", authz.NODE)
    for method in ("/ferry.v1.Transfer/Holdings", "/ferry.v1.Transfer/Receive"):
        assert "may not call" in str(refusal(method, user))
        assert refusal(method, node) is None
    node_may = {
        m for m in authz.RULES if m.startswith(authz.CONTROL_API) and refusal(m, node) is None
    }
    assert node_may == {
        "/ferry.v1.Control/CreateVolume",
        "/ferry.v1.Control/MoveVolume",
        "/ferry.v1.Control/DeleteVolume",
        "/ferry.v1.Control/ReportCreateFailure",
    }
    assert authz.create_failure_refusal(node, "host1", "v") is None
    assert "placed on itself" in str(authz.create_failure_refusal(node, "host2", "v"))
    assert authz.create_failure_refusal(user, "host2", "v") is None


def test_an_unknown_method_or_kind_is_refused_and_insecure_lets_everyone_in() -> None:
    assert "no authorization rule" in str(refusal("/ferry.v1.Control/Other", Caller("a", "user")))
    etcd_only = Caller("etcd1", "etcd-peer")
    assert "may not call" in str(refusal("/ferry.v1.Control/ListVolumes", etcd_only))
    anyone = Caller("ipv4:127.0.0.1:1", authz.INSECURE)
    assert refusal("/ferry.v1.Transfer/Receive", anyone) is None
    assert authz.move_refusal(anyone, "elsewhere") is None


def test_node_limits_for_move_and_delete() -> None:
    node = Caller("host1", authz.NODE)
    assert authz.move_refusal(node, "host1") is None
    assert "only to itself" in str(authz.move_refusal(node, "host2"))
    assert authz.move_refusal(Caller("alice", authz.USER), "host2") is None
    assert authz.delete_refusal(node, "host1", "v", force=False) is None
    assert "may not force" in str(authz.delete_refusal(node, "host1", "v", force=True))
    assert "host2's Docker plugin" in str(authz.delete_refusal(node, "host2", "v", force=False))
    assert "created with ferryctl" in str(authz.delete_refusal(node, "", "v", force=False))
    assert authz.delete_refusal(Caller("alice", authz.USER), "", "v", force=True) is None


@pytest.mark.parametrize("kind", ca.KINDS)
def test_the_kind_is_read_as_ferryctl_ca_issue_writes_it(tmp_path: Path, kind: str) -> None:
    ca.init(tmp_path)
    name = "root" if kind == "etcd-root" else "az-one"  # etcd's administrator has one name
    cert, _key = ca.issue(tmp_path, kind, name)
    assert caller_from_certificate(cert.read_bytes()) == Caller(name, kind)


def test_a_certificate_without_a_kind_says_how_to_reissue_it(tmp_path: Path) -> None:
    ca.init(tmp_path)  # the CA certificate itself carries no kind
    with pytest.raises(NoKind, match=re.escape("'ferryctl ca issue --kind node|user|control")):
        caller_from_certificate((tmp_path / "ca.crt").read_bytes())
