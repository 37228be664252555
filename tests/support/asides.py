"""Copies kept aside on in-process nodes (tests/support/nodes.py): found, read, listed."""

from __future__ import annotations

import json
from pathlib import Path

from agent import zfs
from agent.zfs.volumes import retry_busy
from tests.support.etcd import ControlServer, ferryctl
from tests.support.nodes import Node


def aside_datasets(node: Node) -> list[bytes]:
    return zfs.lzc_list_children(node.root.aside)


def read_aside(node: Node, dataset: bytes, file: str, where: Path) -> str:
    """A file of a copy kept aside, read from a read-only mount made for the test."""
    zfs.lzc_set_prop(dataset, "mountpoint", str(where))
    zfs.zfs_mount(dataset)
    try:
        return (where / file).read_text()
    finally:
        retry_busy(lambda: zfs.zfs_unmount(dataset), "unmount the copy kept aside")
        zfs.lzc_inherit_prop(dataset, "mountpoint")


async def listed(control: ControlServer, volume: str) -> list[dict[str, object]]:
    result = await ferryctl(control.ferryctl_env(), "volume", "get", volume, "-o", "json")
    assert result.code == 0, result.stderr
    diverged: list[dict[str, object]] = json.loads(result.stdout)["diverged"]
    return diverged
