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
