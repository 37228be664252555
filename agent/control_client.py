"""The node's requests to ferry-control, over gRPC with this node's certificate.

Neither the Docker plugin nor the convergence loop writes volume specs to etcd
itself: control decides what a node may ask for (``ferry.security.authz``:
create, move to itself, report a failed create), so etcd denies nodes write
access to ``volumes/``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from agent.plugin import PluginError
from ferry.core.plan import Create
from ferry.security.certificates import CertificateWatch
from ferry.security.redial import Redial, follow_renewals
from ferry.security.tls import TlsFiles
from protos.ferry.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

CONTROL_NAME = "control"
CALL_TIMEOUT_SECONDS = 30.0
"""Docker gives Create and Mount two minutes; a create or move request is one etcd transaction."""


class ControlClient:
    """``agent.plugin.ControlApi`` against ferry-control at ``address``."""

    def __init__(
        self,
        address: str,
        tls: TlsFiles | CertificateWatch | None,
        here: str,
        redial_grace: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        """With a CertificateWatch, ``redial_if_renewed`` (run by ``follow_renewals``) dials
        again after a renewal; calls running on the old channel get ``redial_grace`` seconds
        (by default as long as a call may take) before it is closed."""
        self._address = address
        self._here = here
        self._redial = None if tls is None else Redial(tls, "ferry-control client", redial_grace)
        self._channel: grpc.aio.Channel | None = None
        self._current: control_pb2_grpc.ControlStub | None = None

    @property
    def _stub(self) -> control_pb2_grpc.ControlStub:
        """The stub of the current channel, dialed on first use (in the running loop)."""
        if self._current is None:
            self._channel = self._dial()
            self._current = control_pb2_grpc.ControlStub(self._channel)
        return self._current

    def _dial(self) -> grpc.aio.Channel:
        if self._redial is None:
            return grpc.aio.insecure_channel(self._address)
        return grpc.aio.secure_channel(
            self._address,
            self._redial.credentials(),
            options=[("grpc.ssl_target_name_override", CONTROL_NAME)],
        )

    async def redial_if_renewed(self) -> bool:
        """A new channel with the renewed certificate, if the files were renewed since the
        last dial; True if it dialed. Calls made from now on use the new channel, the old
        one is closed once its calls had their grace."""
        old = self._channel
        if old is None or self._redial is None or not self._redial.due():
            return False
        self._channel = self._dial()
        self._current = control_pb2_grpc.ControlStub(self._channel)
        await self._redial.retire(old)
        return True

    async def follow_renewals(self) -> None:
        """Until cancelled: dial again after each renewal of this node's certificate."""
        if self._redial is not None:
            await follow_renewals(self.redial_if_renewed, "ferry-control client")

    async def create_volume(
        self,
        name: str,
        size: str,
        compression: str,
        node: str,
        replication: Mapping[str, str],
        failover: str = "",
        failover_after: float = 0.0,
    ) -> None:
        """Without a node option, the volume is created where Docker asked for it.

        An existing volume is taken as it is when no option asks for anything else.
        """
        replicas = replication.get("replicas", "")
        if replicas and not replicas.isdigit():
            raise PluginError(f"invalid replicas {replicas!r}: a whole number, 0 for none")
        request = control_pb2.CreateVolumeRequest(
            name=name,
            size=size,
            compression=compression,
            node=node or self._here,
            failover=failover,
            failover_after=failover_after,
            replicas=int(replicas) if replicas else None,
            rpo=replication.get("rpo", ""),
            replace_after=replication.get("replace_after", ""),
        )
        try:
            await self._stub.CreateVolume(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise self._failed(error) from error
            if size or compression or node or replication or failover or failover_after:
                raise PluginError(
                    f"volume {name} already exists; omit options to use it as it is"
                ) from None

    async def delete_volume(self, name: str) -> None:
        try:
            reply = await self._stub.DeleteVolume(
                control_pb2.DeleteVolumeRequest(name=name), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error
        if reply.notice:
            # Docker's Remove has no place for a notice: the agent's log says it.
            log.warning("volume removed through Docker: volume=%s notice=%s", name, reply.notice)

    async def move_volume(self, name: str, node: str) -> None:
        try:
            await self._stub.MoveVolume(
                control_pb2.MoveVolumeRequest(name=name, node=node), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error

    async def report_create_failure(self, create: Create, why: str) -> None:
        """ZFS refused ``create`` for good: control stores why in the spec (nodes have no
        write right on ``volumes/``)."""
        request = control_pb2.CreateFailureRequest(
            name=create.volume, uid=create.uid, size_bytes=create.size_bytes, error=why
        )
        try:
            await self._stub.ReportCreateFailure(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise self._failed(error) from error

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)

    def _failed(self, error: grpc.aio.AioRpcError) -> PluginError:
        """Control's one-sentence answer as Docker shows it; an unreachable control says so."""
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return PluginError(
                f"cannot reach ferry-control at {self._address} ({error.details()}); is it "
                f"running, and is the agent's --control right?"
            )
        return PluginError(str(error.details()))
