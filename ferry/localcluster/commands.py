"""Outside commands for local-cluster: each bounded in time, failures as ClusterError."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("local-cluster")

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 60.0


class ClusterError(Exception):
    """A failure the operator can act on; the message says what to do."""


def run(
    argv: Sequence[str], check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise ClusterError with its stderr."""
    log.debug("run argv=%s", " ".join(argv))
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ClusterError(
            f"{argv[0]} is not installed; install it (see deploy/install.sh)"
        ) from exc
    if check and result.returncode != 0:
        raise ClusterError(
            f"'{' '.join(argv)}' failed with exit code {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result


def wait_until(
    what: str, ready: Callable[[], bool], timeout: float, alive: Callable[[], None]
) -> None:
    """Poll `ready` until true; `alive` raises when the thing being waited for died."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        if ready():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(0.2)


def tcp_open(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1.0):
        return True
    return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            "local-cluster needs root (network namespaces, zpool, dockerd); run it with sudo"
        )


def ferry_command(name: str, ferry_bin: Path | None) -> str | None:
    """From --ferry-bin if given; else the venv's console script (local-cluster runs with the
    venv's python); else PATH."""
    if ferry_bin is not None:
        chosen = ferry_bin / name
        return str(chosen) if os.access(chosen, os.X_OK) else None
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)
