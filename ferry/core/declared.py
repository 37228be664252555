"""The file ``ferryctl apply -f`` reads, and the changes that make etcd match it.

A file lists volumes::

    volumes:
      - name: pg
        size: 10G
        compression: lzjb
        node: host1
        replicas: 1        # standby copies besides the owner's
        rpo: 15s           # the most data, in time, losing the owner's host may cost
        replace_after: 5m  # a replica's node down this long: the replica goes elsewhere

It is checked whole before anything changes: any error names its line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from ferry.core.records import check_node_name, parse_duration, parse_size, validate_volume_name

FIELDS = frozenset({"name", "size", "compression", "node", "replicas", "rpo", "replace_after"})


class DeclarationError(ValueError):
    """The file is malformed; the message starts with ``FILE:LINE:``."""


@dataclass(frozen=True)
class Declared:
    """One volume as the file wants it; empty fields mean 'whatever it is now'."""

    name: str
    size_bytes: int | None
    size: str
    compression: str
    node: str
    line: int
    replicas: int | None = None
    rpo: str = ""
    replace_after: str = ""


@dataclass(frozen=True)
class Current:
    """One volume as control reports it."""

    name: str
    size_bytes: int
    compression: str
    node: str
    replicas: int = 0
    rpo_seconds: int = 0
    replace_after_seconds: int = 0


@dataclass(frozen=True)
class Change:
    """``create``, ``move``, ``update`` or ``delete`` of one volume, and why."""

    action: str
    name: str
    detail: str


def parse(text: str, source: str = "<file>") -> list[Declared]:
    """Every volume of the file, or DeclarationError at the first fault."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise DeclarationError(f"{source}:{line}: not valid YAML: {error}") from error
    if root is None or not isinstance(root, yaml.MappingNode):
        raise DeclarationError(f"{source}:1: expected a mapping with a 'volumes' list")
    top = {k.value: v for k, v in root.value}
    unknown = set(top) - {"volumes"}
    if unknown:
        raise DeclarationError(f"{source}:1: unknown top-level key(s) {', '.join(sorted(unknown))}")
    items = top.get("volumes")
    if items is None or items.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(items, yaml.SequenceNode):
        raise DeclarationError(f"{source}:{items.start_mark.line + 1}: 'volumes' must be a list")
    declared: list[Declared] = []
    seen: dict[str, int] = {}
    for item in items.value:
        entry = _entry(item, source)
        if entry.name in seen:
            raise DeclarationError(
                f"{source}:{entry.line}: volume {entry.name} is declared twice "
                f"(first on line {seen[entry.name]})"
            )
        seen[entry.name] = entry.line
        declared.append(entry)
    return declared


def _entry(node: yaml.Node, source: str) -> Declared:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise DeclarationError(f"{source}:{line}: each volume must be a mapping (name: ...)")
    values: dict[str, str] = {}
    for key, value in node.value:
        if key.value not in FIELDS:
            raise DeclarationError(
                f"{source}:{key.start_mark.line + 1}: unknown key {key.value!r}; "
                f"use {', '.join(sorted(FIELDS))}"
            )
        if not isinstance(value, yaml.ScalarNode):
            raise DeclarationError(
                f"{source}:{value.start_mark.line + 1}: {key.value} must be a value"
            )
        values[key.value] = str(value.value)
    try:
        name = validate_volume_name(values.get("name", ""))
        size = values.get("size", "")
        size_bytes = parse_size(size) if size else None
        node_name = values.get("node", "")
        if node_name:
            check_node_name(node_name)
        replicas = _replicas(values.get("replicas", ""))
        for duration in ("rpo", "replace_after"):
            if values.get(duration):
                parse_duration(values[duration])
    except ValueError as error:
        raise DeclarationError(f"{source}:{line}: {error}") from error
    return Declared(
        name,
        size_bytes,
        size,
        values.get("compression", ""),
        node_name,
        line,
        replicas=replicas,
        rpo=values.get("rpo", ""),
        replace_after=values.get("replace_after", ""),
    )


def _replicas(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"invalid replicas {text!r}: a whole number, 0 for none")
    return int(text)


def changes(
    declared: Sequence[Declared], current: Mapping[str, Current], prune: bool
) -> list[Change]:
    """What must change so that control's state matches the file."""
    out: list[Change] = []
    for want in declared:
        have = current.get(want.name)
        if have is None:
            where = want.node or "the node with most free space"
            out.append(Change("create", want.name, f"on {where}"))
            continue
        if want.node and want.node != have.node:
            out.append(Change("move", want.name, f"{have.node} -> {want.node}"))
        diffs = []
        if want.size_bytes is not None and want.size_bytes != have.size_bytes:
            diffs.append(f"size {have.size_bytes} -> {want.size_bytes}")
        if want.compression and want.compression != have.compression:
            diffs.append(f"compression {have.compression} -> {want.compression}")
        if want.replicas is not None and want.replicas != have.replicas:
            diffs.append(f"replicas {have.replicas} -> {want.replicas}")
        for what, text, seconds in (
            ("rpo", want.rpo, have.rpo_seconds),
            ("replace_after", want.replace_after, have.replace_after_seconds),
        ):
            if text and parse_duration(text) != seconds:
                diffs.append(f"{what} {seconds}s -> {parse_duration(text)}s")
        if diffs:
            out.append(Change("update", want.name, ", ".join(diffs)))
    if prune:
        wanted = {w.name for w in declared}
        out.extend(
            Change("delete", name, "not in the file")
            for name in sorted(current)
            if name not in wanted
        )
    return out
