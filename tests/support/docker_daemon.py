"""A private, real ``dockerd`` for integration tests, started and always cleaned up.

It runs in the root network namespace with its own data root, exec root, pid
file and Unix socket under one temporary directory, no bridge and no iptables
rules (containers use ``--network none``), and its own containerd namespace, so
it never touches the machine's Docker or another test's daemon. Images come
from ``deploy/images/build.sh`` (its cache makes this take seconds).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException

from tests.support.service import TestService

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "deploy" / "images" / "build.sh"


class DockerDaemonError(RuntimeError):
    """dockerd did not start or answer; the message carries the end of its log."""


class DockerDaemon(TestService):
    """One private dockerd; use as a context manager so it is always stopped."""

    def __init__(self, prefix: str = "im", start_timeout: float = 60.0) -> None:
        # The name is also the containerd namespace, which allows only letters and
        # digits between single separators: mkdtemp's suffix may end in "_".
        self.name = f"{prefix}-dockerd-{secrets.token_hex(4)}"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.url = f"unix://{self.socket}"
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._client: docker.DockerClient | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise DockerDaemonError(f"dockerd {self.name} is not running; call start() first")
        return self._client

    def start(self) -> None:
        if shutil.which("dockerd") is None:
            pytest.fail("no dockerd command: run deploy/install.sh --dev (docker.io)")
        command = [
            "dockerd",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'docker.pid'}",
            f"--host={self.url}",
            f"--containerd-namespace={self.name}",
            f"--containerd-plugins-namespace={self.name}-plugins",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--shutdown-timeout=10",
        ]
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("dockerd starting: daemon=%s pid=%d", self.name, self._process.pid)
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._process.poll() is not None:
                raise DockerDaemonError(
                    f"dockerd {self.name} exited with {self._process.returncode} during start-up; "
                    f"its log:\n{self._log_tail()}"
                )
            try:
                client = docker.DockerClient(base_url=self.url, version="auto", timeout=120)
                client.ping()
            except DockerException as error:
                if time.monotonic() > deadline:
                    raise DockerDaemonError(
                        f"dockerd {self.name} did not answer on {self.socket} within "
                        f"{self._start_timeout:.0f}s ({error}); its log:\n{self._log_tail()}"
                    ) from error
                time.sleep(0.2)
                continue
            self._client = client
            log.info("dockerd ready: daemon=%s socket=%s", self.name, self.socket)
            return

    def load_images(self, *images: str, cache_dir: Path | None = None) -> str:
        """Builds (or takes from the cache) and imports ``images``; returns build.sh's report."""
        command = [str(BUILD_SCRIPT), "--docker-host", self.url]
        if cache_dir is not None:
            command += ["--cache-dir", str(cache_dir)]
        result = subprocess.run(
            [*command, *images], capture_output=True, text=True, timeout=1800, check=False
        )
        if result.returncode != 0:
            raise DockerDaemonError(
                f"{BUILD_SCRIPT.name} failed ({result.returncode}) for {' '.join(images)}:\n"
                f"{result.stderr[-3000:]}"
            )
        log.info("images loaded: daemon=%s images=%s", self.name, ",".join(images))
        return result.stderr

    def close(self) -> None:
        """Stops dockerd and its containers, unmounts what they left, removes the directory."""
        if self._client is not None:
            self._remove_containers(self._client)
            self._client.close()
            self._client = None
        if self._process is not None:
            self._terminate(self._process)
            self._process = None
        self._kill_leftover_processes()
        self._unmount_all()
        shutil.rmtree(self.root, ignore_errors=True)
        log.info("dockerd stopped and removed: daemon=%s", self.name)

    def _remove_containers(self, client: docker.DockerClient) -> None:
        try:
            for container in client.containers.list(all=True):
                container.remove(force=True, v=True)
        except DockerException as error:
            log.warning("could not remove containers: daemon=%s error=%s", self.name, error)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("dockerd ignored SIGTERM, killing it: daemon=%s", self.name)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def _kill_leftover_processes(self) -> None:
        """Kills containerd and shims of this daemon that outlived it (found by our unique name)."""
        for pid in set(_pids_with_argument(self.name)) - {os.getpid()}:
            try:
                os.kill(pid, signal.SIGKILL)
                log.warning("killed leftover process: daemon=%s pid=%d", self.name, pid)
            except ProcessLookupError:
                pass

    def _unmount_all(self) -> None:
        for mountpoint in sorted(_mountpoints_under(self.root), key=len, reverse=True):
            result = subprocess.run(
                ["umount", "--lazy", mountpoint], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                log.warning(
                    "could not unmount: daemon=%s mountpoint=%s error=%s",
                    self.name,
                    mountpoint,
                    result.stderr.strip(),
                )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"


def _mountpoints_under(root: Path) -> list[str]:
    prefix = f"{root}/"
    mountpoints = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = _unescape_mount_path(line.split()[4])
        if mountpoint == str(root) or mountpoint.startswith(prefix):
            mountpoints.append(mountpoint)
    return mountpoints


def _unescape_mount_path(path: str) -> str:
    """Undoes mountinfo's octal escapes (``\\040`` for a space and so on)."""
    return path.encode().decode("unicode_escape")


def _pids_with_argument(word: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            arguments = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(word.encode() in argument for argument in arguments):
            pids.append(int(proc.name))
    return pids
