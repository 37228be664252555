"""Files on this machine's pools, for the ZFS layer's integration tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_random(path: Path, size: int) -> str:
    """Write ``size`` incompressible bytes to ``path``, fsynced; returns their sha256."""
    data = os.urandom(size)
    with path.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return hashlib.sha256(data).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, by relative path (``.zfs`` left out)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".zfs" not in p.parts
    }
