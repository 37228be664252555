"""A real etcd for tests: free loopback ports, a data dir in a temporary directory, always removed.

``EtcdServer`` is a context manager. ``stop()``/``restart()`` keep the data
dir, so a test can prove that nothing is lost across an etcd restart;
``kill()`` is SIGKILL, the crash case.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import pytest

log = logging.getLogger(__name__)

ETCD_BINARY = Path("/usr/bin/etcd")
START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One etcd member named ``ct-<random>`` serving on ``127.0.0.1:<port>``."""

    def __init__(self, prefix: str = "ct") -> None:
        if not ETCD_BINARY.exists():
            pytest.skip(f"{ETCD_BINARY} missing: apt-get install etcd-server")
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """Start etcd (reusing the data dir) and wait until it reports healthy."""
        client_url = f"http://{self.endpoint}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        command = [
            str(ETCD_BINARY),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"{self.name}={peer_url}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self.name,
        ]
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_healthy()
        log.info("etcd started: name=%s endpoint=%s", self.name, self.endpoint)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"etcd {self.name} exited with {self._process.returncode}: "
                    f"see {self.log_path}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"etcd {self.name} not healthy in {START_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM and wait; the data dir stays for ``restart()``."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL, like a crash; the data dir stays."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data dir."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill etcd and remove its data dir."""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
