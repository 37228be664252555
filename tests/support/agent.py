"""A ``ferry-agent`` process on a scratch pool and loopback ports, on mutual TLS, for tests.

Commands the agent started in sessions of their own (``agent.zfs.runner`` does that) are
killed with it, so a hung command a test provoked does not outlive the test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ferry.security.tls import TlsFiles
from tests.support.etcd import SOURCE_TREE, VENV_BIN, free_port, terminate
from tests.support.service import TestService

log = logging.getLogger(__name__)


class AgentProcess(TestService):
    """``ferry-agent`` for node ``node`` on ``pool`` with the node's certificate ``tls`` (its
    etcd user must exist), its plugin asking ``control``; ``env`` adds FERRY_* settings."""

    def __init__(
        self,
        node: str,
        pool: str,
        etcd: str,
        control: str,
        tls: TlsFiles,
        workdir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.node = node
        self.port = free_port()
        self.plugin_socket = workdir / f"{node}-plugin.sock"
        self.log_path = workdir / f"{node}-agent.log"
        self._command = [
            str(VENV_BIN / "ferry-agent"),
            "--node",
            node,
            "--etcd",
            etcd,
            "--pool",
            pool,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-port",
            str(free_port()),
            "--mount-root",
            str(workdir / f"{node}-mnt"),
            "--plugin-socket",
            str(self.plugin_socket),
            "--control",
            control,
            "--tls-ca",
            str(tls.ca),
            "--tls-cert",
            str(tls.cert),
            "--tls-key",
            str(tls.key),
        ]
        self._env = {**os.environ, **SOURCE_TREE, **(env or {})}
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(
                self._command, env=self._env, stdout=out, stderr=subprocess.STDOUT
            )
        log.info("ferry-agent started: node=%s log=%s", self.node, self.log_path)

    def close(self) -> None:
        if self._process is None:
            return
        children = _children(self._process.pid)
        terminate(self._process)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._process = None

    async def plugin_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a Docker plugin call to the agent's socket, as dockerd does; the JSON reply."""
        return await plugin_call(self.plugin_socket, path, body)


async def plugin_call(socket_path: Path, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a Docker plugin call (``/VolumeDriver.Remove``...) to a plugin socket, as dockerd
    does, with no Docker in between to refuse first; the JSON reply."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(f"http://plugin{path}", data=json.dumps(body)) as reply,
    ):
        return dict(json.loads(await reply.read()))


def _children(parent: int) -> list[int]:
    """Processes whose parent is ``parent``, whatever session they are in."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found
