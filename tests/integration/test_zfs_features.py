"""Feature detection against the ZFS that runs: kernel OpenZFS where /dev/zfs exists, else zfs-fuse.

The conformance suite checks each feature's behaviour in the branch that
``features()`` picks; this checks that the pick is right, so a detection
that misses a feature cannot hide it behind the zfs-fuse branch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.zfs import cli

pytestmark = pytest.mark.integration

KERNEL_ONLY = {"resumable_receive", "send_estimate", "list_holds", "bookmarks", "lz4"}


def test_features_match_the_zfs_that_runs() -> None:
    found = cli.features()
    present = {name for name in KERNEL_ONLY if getattr(found, name)}
    if Path("/dev/zfs").exists():
        assert present == KERNEL_ONLY
        assert found.multi_snapshot
        assert {"compress", "large_blocks", "embedded_data", "raw"} <= found.send_flags
    else:
        assert present == set()
        assert not found.multi_snapshot
        assert found.send_flags == frozenset()
