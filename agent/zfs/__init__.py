"""Ferry's ZFS layer: the libzfs_core API of OpenZFS's pyzfs, on whichever backend exists.

Same function names, arguments and exception classes as pyzfs
(``lzc_create``, ``lzc_snapshot``, ``lzc_send``, ``lzc_receive``, ...), plus
what pyzfs lacks on stock OpenZFS (properties, listing, mount). Names are
``bytes`` or ``str`` and are validated before anything runs.

Backends, picked once at import: OpenZFS's ``libzfs_core`` binding when it
imports and ``/dev/zfs`` exists, else the ``zfs``/``zpool`` commands (the
default; drives zfs-fuse too). ``FERRY_ZFS_BACKEND=cli`` forces the commands.
Everything above this package uses only what it exports.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from agent.zfs import cli, lzc
from agent.zfs.cli import (
    Features,
    ResumePoint,
    bookmark_guids,
    features,
    hold_count,
    lzc_get_props,
    lzc_inherit_prop,
    lzc_list_children,
    lzc_list_snaps,
    lzc_set_prop,
    pool_free_bytes,
    receive_abort,
    receive_resume_token,
    send_resume,
    send_resume_point,
    snapshot_guids,
    zfs_mount,
    zfs_unmount,
)
from agent.zfs.exceptions import *  # noqa: F403  (the pyzfs exception names are this API)
from agent.zfs.exceptions import ZFSError
from agent.zfs.runner import Running
from agent.zfs.runner import running as running_commands


def _pick() -> tuple[str, dict[str, Callable[..., Any]]]:
    if os.environ.get("FERRY_ZFS_BACKEND", "") != "cli" and lzc.available():
        return "libzfs_core", lzc.functions()
    return "cli", {}


_BACKEND, _NATIVE = _pick()


def backend_name() -> str:
    """``libzfs_core`` or ``cli``."""
    return _BACKEND


lzc_create = _NATIVE.get("lzc_create", cli.lzc_create)
lzc_snapshot = _NATIVE.get("lzc_snapshot", cli.lzc_snapshot)
lzc_destroy_snaps = _NATIVE.get("lzc_destroy_snaps", cli.lzc_destroy_snaps)
lzc_destroy = _NATIVE.get("lzc_destroy", cli.lzc_destroy)
lzc_exists = _NATIVE.get("lzc_exists", cli.lzc_exists)
lzc_send = _NATIVE.get("lzc_send", cli.lzc_send)
lzc_receive = _NATIVE.get("lzc_receive", cli.lzc_receive)
lzc_receive_resumable = _NATIVE.get("lzc_receive_resumable", cli.lzc_receive_resumable)
lzc_send_space = _NATIVE.get("lzc_send_space", cli.lzc_send_space)
lzc_hold = _NATIVE.get("lzc_hold", cli.lzc_hold)
lzc_release = _NATIVE.get("lzc_release", cli.lzc_release)
lzc_get_holds = _NATIVE.get("lzc_get_holds", cli.lzc_get_holds)
lzc_rollback = _NATIVE.get("lzc_rollback", cli.lzc_rollback)
lzc_rollback_to = _NATIVE.get("lzc_rollback_to", cli.lzc_rollback_to)
lzc_rename = _NATIVE.get("lzc_rename", cli.lzc_rename)
lzc_clone = _NATIVE.get("lzc_clone", cli.lzc_clone)
lzc_promote = _NATIVE.get("lzc_promote", cli.lzc_promote)
lzc_bookmark = _NATIVE.get("lzc_bookmark", cli.lzc_bookmark)
lzc_destroy_bookmarks = _NATIVE.get("lzc_destroy_bookmarks", cli.lzc_destroy_bookmarks)

__all__ = [
    "Features",
    "ResumePoint",
    "Running",
    "ZFSError",
    "backend_name",
    "bookmark_guids",
    "features",
    "hold_count",
    "lzc_bookmark",
    "lzc_clone",
    "lzc_create",
    "lzc_destroy",
    "lzc_destroy_bookmarks",
    "lzc_destroy_snaps",
    "lzc_exists",
    "lzc_get_holds",
    "lzc_get_props",
    "lzc_hold",
    "lzc_inherit_prop",
    "lzc_list_children",
    "lzc_list_snaps",
    "lzc_promote",
    "lzc_receive",
    "lzc_receive_resumable",
    "lzc_release",
    "lzc_rename",
    "lzc_rollback",
    "lzc_rollback_to",
    "lzc_send",
    "lzc_send_space",
    "lzc_set_prop",
    "lzc_snapshot",
    "pool_free_bytes",
    "receive_abort",
    "receive_resume_token",
    "running_commands",
    "send_resume",
    "send_resume_point",
    "snapshot_guids",
    "zfs_mount",
    "zfs_unmount",
]
