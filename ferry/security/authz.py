"""Who may call what: the kind in a caller's certificate, and the one table of RPCs per kind.

A pure module: ``ferry.security.gate`` enforces ``RULES`` on every RPC of
ferry-control and of the agents' Transfer service, and the services apply
the node limits below where a request's arguments matter. docs/control.md
shows the same table (a unit test compares them).

The kind is the certificate's organizational unit, as ``ferry.security.ca.issue``
writes it (``--kind``). Default deny: a method without a rule, a certificate
without a kind, or a kind no rule names (an etcd-only certificate) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

CONTROL = "control"
NODE = "node"
USER = "user"
INSECURE = "insecure"
"""The caller's kind on a server started with --insecure: nobody is checked."""

EVERYONE = frozenset({CONTROL, NODE, USER})


@dataclass(frozen=True)
class Rule:
    """The kinds that may call one RPC; ``mutating`` calls are logged with their caller."""

    kinds: frozenset[str]
    mutating: bool
    node_limit: str = ""
    """What a node's request must satisfy besides its kind (enforced by the service)."""


CONTROL_API = "/ferry.v1.Control/"
TRANSFER_API = "/ferry.v1.Transfer/"
HEALTH_API = "/grpc.health.v1.Health/"

NODE_MOVE_LIMIT = "only to itself (a Docker Mount there)"
NODE_DELETE_LIMIT = "only a volume its own plugin created, unmounted everywhere, not forced"
NODE_CREATE_LIMIT = "any node (the plugin's -o node=); the spec records the node that asked"
NODE_CREATE_FAILURE_LIMIT = "only for a volume placed on itself"

RULES: dict[str, Rule] = {
    CONTROL_API + "CreateVolume": Rule(frozenset({USER, NODE}), True, NODE_CREATE_LIMIT),
    CONTROL_API + "MoveVolume": Rule(frozenset({USER, NODE}), True, NODE_MOVE_LIMIT),
    CONTROL_API + "DeleteVolume": Rule(frozenset({USER, NODE}), True, NODE_DELETE_LIMIT),
    CONTROL_API + "UpdateVolume": Rule(frozenset({USER}), True),
    CONTROL_API + "GetVolume": Rule(frozenset({USER}), False),
    CONTROL_API + "ListVolumes": Rule(frozenset({USER}), False),
    CONTROL_API + "ListNodes": Rule(frozenset({USER}), False),
    CONTROL_API + "WatchVolume": Rule(frozenset({USER}), False),
    CONTROL_API + "ListAsides": Rule(frozenset({USER}), False),
    CONTROL_API + "DropAside": Rule(frozenset({USER}), True),
    CONTROL_API + "WatchEvents": Rule(frozenset({USER}), False),
    CONTROL_API + "ReportCreateFailure": Rule(frozenset({NODE}), True, NODE_CREATE_FAILURE_LIMIT),
    CONTROL_API + "FailoverVolume": Rule(frozenset({USER}), True),
    TRANSFER_API + "Holdings": Rule(frozenset({NODE}), False),
    TRANSFER_API + "Receive": Rule(frozenset({NODE}), True),
    HEALTH_API + "Check": Rule(EVERYONE, False),
    HEALTH_API + "List": Rule(EVERYONE, False),
    HEALTH_API + "Watch": Rule(EVERYONE, False),
}


class NoKind(ValueError):
    """The certificate names no kind, or several: it cannot be authorized."""


@dataclass(frozen=True)
class Caller:
    """Who called: the certificate's common name and kind (``INSECURE`` without TLS)."""

    name: str
    kind: str

    @property
    def checked(self) -> bool:
        """False on an insecure server, where no limit applies."""
        return self.kind != INSECURE


def caller_from_certificate(pem: bytes) -> Caller:
    """The name and kind in a client certificate (PEM); NoKind says how to reissue it."""
    subject = x509.load_pem_x509_certificate(pem).subject
    names = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    name = names[0] if names else "(no common name)"
    kinds = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if len(kinds) != 1:
        found = "no kind" if not kinds else f"several kinds ({', '.join(kinds)})"
        raise NoKind(
            f"the certificate of {name!r} has {found}; reissue it with "
            f"'ferryctl ca issue --kind node|user|control --name {name}'"
        )
    return Caller(name, kinds[0])


def refusal(method: str, caller: Caller) -> str | None:
    """Why ``caller`` may not call ``method`` (a full gRPC method name), or None if it may."""
    if not caller.checked:
        return None
    rule = RULES.get(method)
    if rule is None:
        return f"{method} has no authorization rule; nobody may call it"
    if caller.kind not in rule.kinds:
        allowed = " or ".join(sorted(rule.kinds))
        return (
            f"a {caller.kind} certificate ({caller.name}) may not call {method}; "
            f"it takes a {allowed} certificate"
        )
    return None


def move_refusal(caller: Caller, target: str) -> str | None:
    """A node moves volumes only to itself: what its plugin's Mount needs, nothing more."""
    if caller.checked and caller.kind == NODE and target != caller.name:
        return (
            f"node {caller.name} may move a volume only to itself, not to {target!r}; "
            f"move it with 'ferryctl volume move' (a user certificate)"
        )
    return None


def create_failure_refusal(caller: Caller, placed_on: str, volume: str) -> str | None:
    """A node reports a failed create only for a volume placed on itself."""
    if caller.checked and caller.kind == NODE and placed_on != caller.name:
        return (
            f"node {caller.name} may report a failed create only for a volume placed on "
            f"itself; {volume} is placed on {placed_on}"
        )
    return None


def delete_refusal(caller: Caller, created_by_node: str, volume: str, force: bool) -> str | None:
    """A node deletes only what its own plugin created, never forced (docs/decisions.md)."""
    if not caller.checked or caller.kind != NODE:
        return None
    if force:
        return f"node {caller.name} may not force a delete; use 'ferryctl volume delete --force'"
    if created_by_node == caller.name:
        return None
    if created_by_node:
        return (
            f"volume {volume} was created by {created_by_node}'s Docker plugin: remove it on "
            f"{created_by_node}, or with 'ferryctl volume delete {volume}'"
        )
    return (
        f"volume {volume} was created with ferryctl: delete it with "
        f"'ferryctl volume delete {volume}'"
    )
