"""Real ZFS pools for tests: a sparse file under /var/tmp, a unique name, always destroyed.

``scratch_pool()`` is a context manager; ``pool_fixture()`` turns it into a
pytest fixture for a test module. The pool's root is mounted under a fresh
temporary directory, so nothing a test mounts lands outside it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.zfs.volumes import PoolRoot, guard_mountpoint

log = logging.getLogger(__name__)

POOL_BYTES = 1 << 30
POOL_FILE_DIR = Path("/var/tmp")


@dataclass(frozen=True)
class ScratchPool:
    """A pool made for one test (module): its name, backing file and mount base."""

    name: str
    file: Path
    mount_base: Path

    def dataset(self, *components: str) -> bytes:
        """``pool/a/b`` as bytes, the way the ZFS API takes names."""
        return "/".join((self.name, *components)).encode()

    def path(self, *components: str) -> Path:
        """Where ``pool/a/b`` is mounted when it inherits its mountpoint."""
        return self.mount_base.joinpath(*components)


def create_in_use(
    root: PoolRoot, volume: str, size_bytes: int, compression: str, where: Path
) -> None:
    """A volume as its owner holds it while a container uses it: created, activated (not
    read-only) and mounted at ``where``."""
    root.create_volume(volume, size_bytes, compression, where)
    root.set_readonly(volume, False)
    root.mount(volume, where)


def _zpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["zpool", *args], capture_output=True, text=True, check=False)


def _require_zfs() -> None:
    if shutil.which("zpool") is None:
        pytest.fail("no zpool command: install ZFS with deploy/install.sh --dev")
    if _zpool("list").returncode != 0:
        pytest.fail("zpool does not answer: start zfs-fuse with deploy/zfs-fuse-up.sh")


@contextlib.contextmanager
def scratch_pool(prefix: str = "zt", size_bytes: int = POOL_BYTES) -> Iterator[ScratchPool]:
    """Create a pool named ``<prefix>-<random>`` on a sparse file; destroy it on exit, always."""
    _require_zfs()
    name = f"{prefix}-{secrets.token_hex(4)}"
    file = POOL_FILE_DIR / f"{name}.img"
    mount_base = Path(tempfile.mkdtemp(prefix=f"{name}-mnt-"))
    try:
        with file.open("wb") as backing:
            backing.truncate(size_bytes)
        created = _zpool("create", "-m", str(mount_base), name, str(file))
        if created.returncode != 0:
            raise RuntimeError(f"zpool create {name} failed: {created.stderr.strip()}")
        log.info("test pool created: pool=%s file=%s", name, file)
        yield ScratchPool(name=name, file=file, mount_base=mount_base)
    finally:
        _destroy(name)
        file.unlink(missing_ok=True)
        shutil.rmtree(mount_base, ignore_errors=True)


def _destroy(name: str) -> None:
    """zfs-fuse may report a pool busy for a moment after its last unmount: retry a few times.
    The guarded (immutable) mountpoints of its datasets are released and removed too."""
    if _zpool("list", name).returncode != 0:
        return
    listed = subprocess.run(
        ["zfs", "list", "-H", "-o", "mountpoint", "-r", name], capture_output=True, text=True
    ).stdout.split()
    try:
        _destroy_pool(name)
    finally:
        for path in (Path(p) for p in listed if p.startswith("/")):
            _release_guard(path)


def _destroy_pool(name: str) -> None:
    """Busy for seconds after the last unmount when zfs-fuse is loaded: up to 20 s."""
    for _ in range(20):
        if _zpool("destroy", "-f", name).returncode == 0:
            log.info("test pool destroyed: pool=%s", name)
            return
        time.sleep(1.0)
    log.error("test pool left behind, destroy it by hand: zpool destroy -f %s", name)


def _release_guard(path: Path) -> None:
    if path.is_dir() and not path.is_mount():
        guard_mountpoint(path, False)
        with contextlib.suppress(OSError):
            path.rmdir()


def pool_fixture(
    prefix: str = "zt", size_bytes: int = POOL_BYTES, scope: str = "function"
) -> Callable[[], Iterator[ScratchPool]]:
    """A pytest fixture yielding a fresh ScratchPool; assign it to a name in the test module."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def pool() -> Iterator[ScratchPool]:
        with scratch_pool(prefix, size_bytes) as made:
            yield made

    return pool
