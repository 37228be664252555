"""The apply file: parsed whole, every fault names its line; the diff against current state."""

from __future__ import annotations

import pytest

from ferry.core.declared import Change, Current, DeclarationError, Declared, changes, parse

GOOD = """\
volumes:
  - name: pg
    size: 10G
    compression: lzjb
    node: host1
  - name: cache
"""


def test_parse_reads_every_field_and_remembers_lines() -> None:
    assert parse(GOOD, "v.yaml") == [
        Declared("pg", 10 << 30, "10G", "lzjb", "host1", 2),
        Declared("cache", None, "", "", "", 6),
    ]


def test_an_empty_volumes_list_declares_nothing() -> None:
    assert parse("volumes:\n") == []
    assert parse("volumes: []\n") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("volumes:\n  - name: pg\n    sise: 1G\n", "v.yaml:3: unknown key 'sise'"),
        ("volumes:\n  - name: pg\n  - name: db\n    size: lots\n", "v.yaml:3: invalid size 'lots'"),
        ("volumes:\n  - name: pg\n    size: 0\n", "v.yaml:2: invalid size '0'"),
        ("volumes:\n  - name: a/b\n", "v.yaml:2: invalid volume name 'a/b'"),
        ("volumes:\n  - size: 1G\n", "v.yaml:2: invalid volume name ''"),
        ("volumes:\n  - name: pg\n    node: Host_1\n", "v.yaml:2: invalid node name 'Host_1'"),
        (
            "volumes:\n  - name: pg\n  - name: db\n  - name: pg\n",
            "v.yaml:4: volume pg is declared twice (first on line 2)",
        ),
        ("volumes:\n  name: pg\n", "v.yaml:2: 'volumes' must be a list"),
        ("volumes:\n  - pg\n", "v.yaml:2: each volume must be a mapping"),
        ("volumes:\n  - name: pg\n    size: [1, 2]\n", "v.yaml:3: size must be a value"),
        ("volumes:\n  - name: pg\n    size: 1G\n   node: x\n", "v.yaml:4: not valid YAML"),
        ("volumes:\n  - name: [pg\n", "v.yaml:3: not valid YAML"),
        ("- name: pg\n", "v.yaml:1: expected a mapping"),
        ("", "v.yaml:1: expected a mapping"),
        ("volume:\n  - name: pg\n", "v.yaml:1: unknown top-level key(s) volume"),
    ],
)
def test_a_malformed_file_is_refused_with_its_line(text: str, message: str) -> None:
    with pytest.raises(DeclarationError) as raised:
        parse(text, "v.yaml")
    assert str(raised.value).startswith(message)


def _declared(name: str, size: str = "", compression: str = "", node: str = "") -> Declared:
    return Declared(name, (int(size) if size else None), size, compression, node, 1)


CURRENT = {
    "pg": Current("pg", 1024, "off", "host1"),
    "old": Current("old", 1024, "off", "host2"),
}


def test_nothing_changes_when_the_file_matches() -> None:
    wanted = [_declared("pg", "1024", "off", "host1"), _declared("old", "1024", "off", "host2")]
    assert changes(wanted, CURRENT, prune=True) == []


def test_empty_fields_keep_what_is_there() -> None:
    assert changes([_declared("pg")], {"pg": CURRENT["pg"]}, prune=False) == []


def test_a_missing_volume_is_created_where_the_file_says_or_on_the_roomiest_node() -> None:
    assert changes([_declared("new", node="host3"), _declared("any")], CURRENT, prune=False) == [
        Change("create", "new", "on host3"),
        Change("create", "any", "on the node with most free space"),
    ]


def test_a_volume_placed_elsewhere_is_moved() -> None:
    assert changes([_declared("pg", node="host2")], CURRENT, prune=False) == [
        Change("move", "pg", "host1 -> host2")
    ]


def test_changed_size_and_compression_are_one_update() -> None:
    assert changes([_declared("pg", "2048", "gzip")], CURRENT, prune=False) == [
        Change("update", "pg", "size 1024 -> 2048, compression off -> gzip")
    ]


def test_volumes_absent_from_the_file_are_deleted_only_with_prune() -> None:
    assert changes([_declared("pg")], CURRENT, prune=False) == []
    assert changes([_declared("pg")], CURRENT, prune=True) == [
        Change("delete", "old", "not in the file")
    ]


def test_replication_fields_are_read_and_changes_listed() -> None:
    from ferry.core.declared import Current, changes, parse

    text = "volumes:\n  - name: pg\n    replicas: 1\n    rpo: 15s\n    replace_after: 5m\n"
    (want,) = parse(text)
    assert (want.replicas, want.rpo, want.replace_after) == (1, "15s", "5m")
    have = Current("pg", 1 << 30, "off", "a", replicas=0)
    (change,) = changes([want], {"pg": have}, prune=False)
    assert change.action == "update"
    assert "replicas 0 -> 1" in change.detail and "rpo 0s -> 15s" in change.detail
    same = Current("pg", 1 << 30, "off", "a", 1, 15, 300)
    assert changes([want], {"pg": same}, prune=False) == []


def test_bad_replication_values_name_their_line() -> None:
    import pytest

    from ferry.core.declared import DeclarationError, parse

    with pytest.raises(DeclarationError, match=r":2: invalid replicas"):
        parse("volumes:\n  - name: pg\n    replicas: many\n", "f.yaml")
    with pytest.raises(DeclarationError, match=r":2: invalid duration"):
        parse("volumes:\n  - name: pg\n    rpo: soon\n", "f.yaml")
