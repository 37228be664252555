"""Compression settings: one set for what every ZFS accepts, one for what a record may hold.

zfs-fuse has no lz4, so control offers only ``EVERYWHERE`` at create; a
record written where lz4 exists may still carry it (``STORABLE``).
"""

from __future__ import annotations

EVERYWHERE = frozenset({"on", "off", "lzjb", "zle", "gzip", *(f"gzip-{n}" for n in range(1, 10))})
STORABLE = EVERYWHERE | {"lz4"}
