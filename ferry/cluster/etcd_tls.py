"""aetcd's client over mutual TLS, with the certificate's common name as the etcd user.

aetcd 1.0 dials only ``grpc.aio.insecure_channel``. ``TlsClient`` overrides the
one method that opens the channel (``connect``) to open a secure channel with
the cluster CA's files instead; every other call, reconnect (gRPC's channel
redials by itself) and watch is aetcd's own. No user name or password is sent:
etcd takes the user from the client certificate's common name, so there is no
auth token, which etcd would expire after 5 idle minutes and aetcd never renews.

Members are verified by the name every etcd certificate carries
(``ferry.security.ca.ETCD_SERVER_NAME``), not by address: one gRPC target may list
several members' addresses.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from ferry.security.ca import ETCD_SERVER_NAME
from ferry.security.tls import TlsFiles

# gRPC refuses a reply over 4 MiB by default; one cluster view (every spec, owner, mount and
# node state in one transaction, 0.8-1.3 KB a volume) passes that at some 3,000-5,000 volumes.
CHANNEL_OPTIONS: dict[str, Any] = {"grpc.max_receive_message_length": 256 << 20}


class TlsClient(aetcd.Client):
    """An ``aetcd.Client`` that dials ``host:port`` over mutual TLS from ``tls``."""

    _is_connecting: bool

    def __init__(self, host: str, port: int, tls: TlsFiles, timeout: int) -> None:
        self._credentials = tls.channel_credentials()
        super().__init__(
            host=host,
            port=port,
            timeout=timeout,
            options={**CHANNEL_OPTIONS, "grpc.ssl_target_name_override": ETCD_SERVER_NAME},
        )

    async def connect(self) -> None:
        """Open the secure channel and aetcd's stubs on it (aetcd 1.0's ``connect`` shape)."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            options: list[tuple[str, Any]] = list(self._options.items())
            self.channel = grpc.aio.secure_channel(
                f"{self._host}:{self._port}", self._credentials, options=options
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self.auth_stub = rpc.AuthStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=None
            )
            self._connected.set()
        finally:
            self._is_connecting = False
