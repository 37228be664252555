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

A renewed certificate is taken up without a restart: ``follow_renewals`` has
the client dial a new channel with the new files once ``CertificateWatch``
accepted them, and close the old one after a grace (``ferry.security.redial``).
Without it the channel kept the old certificate for ever, and its first
reconnect after the old certificate expired (an etcd restart, a cut link) was
refused: the agent could no longer renew its lease and fenced all its volumes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from ferry.security import redial
from ferry.security.ca import ETCD_SERVER_NAME
from ferry.security.certificates import CHECK_SECONDS, CertificateWatch
from ferry.security.redial import Redial
from ferry.security.tls import TlsFiles

CHANNEL_OPTIONS: dict[str, Any] = {
    # gRPC refuses a reply over 4 MiB by default; one cluster view (every spec, owner, mount
    # and node state in one transaction, 0.8-1.3 KB a volume) passes that at 3,000-5,000 volumes.
    "grpc.max_receive_message_length": 256 << 20,
    # gRPC's default redial backoff grows 1.6x a try up to 120 s: after a 20 s etcd outage the
    # channel stayed down several seconds after etcd was back, and every call in that time
    # failed fast. Redialing at least once a second costs one refused connect a second.
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 1000,
}


class TlsClient(aetcd.Client):
    """An ``aetcd.Client`` that dials ``host:port`` over mutual TLS from ``tls``."""

    _is_connecting: bool

    def __init__(
        self, host: str, port: int, tls: TlsFiles | CertificateWatch, timeout: int
    ) -> None:
        """With a CertificateWatch the client can follow renewals (``redial_if_renewed``);
        with plain TlsFiles it dials with them as they are, unchecked."""
        self._redial = Redial(tls, "etcd client")
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
                f"{self._host}:{self._port}", self._redial.credentials(), options=options
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

    async def redial_if_renewed(self) -> bool:
        """A new channel with the renewed certificate, if the files were renewed since the
        last dial; True if it dialed. Calls made from now on use the new channel."""
        if not self._connected.is_set() or not self._redial.due():
            return False
        old = self.channel
        self._connected.clear()
        await self.connect()  # no await before it sets _connected again: nobody sees a gap
        await self._redial.retire(old)
        return True


async def follow_renewals(client: aetcd.Client, every: float = CHECK_SECONDS) -> None:
    """Until cancelled: ``client`` dials again whenever its certificate was renewed (a
    plaintext client has nothing to follow)."""
    if isinstance(client, TlsClient):
        await redial.follow_renewals(client.redial_if_renewed, "etcd client", every)
