"""gRPC client channels that follow certificate renewals: a new channel, the old one retired.

A gRPC channel keeps the credentials it was made with for life, so a client
that never dials again keeps presenting the old certificate; its first
reconnect after that certificate's expiry (the server restarted, a cut link)
is refused. A client that dialed again but kept the old channel open keeps
one connection per renewal for ever. So a client holds a ``Redial``: it dials
with ``credentials()``, asks ``due()`` (a renewal accepted by the
``CertificateWatch`` since that dial), dials again, and hands the old channel
to ``retire``, which lets calls running on it finish for ``grace`` seconds and
then closes it. ``follow_renewals`` does the asking once per CHECK_SECONDS
until cancelled. Used by the etcd client (``ferry.cluster.etcd_tls``) and the
agent's client of ferry-control (``agent.control_client``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from ferry.security.certificates import CHECK_SECONDS, CertificateWatch
from ferry.security.tls import TlsFiles

log = logging.getLogger(__name__)

REDIAL_GRACE_SECONDS = 10.0
"""Calls still running on the channel of the old certificate get this long to finish by
default; a watch then ends with an error, and its caller watches again (on the new channel)."""


class Redial:
    """Which certificate one client dialed with, and the retiring of its old channels.

    With plain TlsFiles there is nothing to follow: the files are used as
    they are, unchecked, and a redial is never due.
    """

    def __init__(
        self, tls: TlsFiles | CertificateWatch, what: str, grace: float = REDIAL_GRACE_SECONDS
    ) -> None:
        self._tls = tls
        self._what = what
        self._cert = tls.files.cert if isinstance(tls, CertificateWatch) else tls.cert
        self._grace = grace
        self._dialed = 0

    def credentials(self) -> grpc.ChannelCredentials:
        """The credentials to dial with now; from here on, ``due`` is about later renewals.

        The generation is read before the files: a renewal taken in between
        (gRPC's threads check the watch too) makes one redial too many, never
        one too few.
        """
        if isinstance(self._tls, CertificateWatch):
            self._dialed = self._tls.generation
        return self._tls.channel_credentials()

    def due(self) -> bool:
        """True if the certificate was renewed since the last ``credentials``."""
        if not isinstance(self._tls, CertificateWatch):
            return False
        self._tls.check()
        return self._tls.generation != self._dialed

    async def retire(self, old: grpc.aio.Channel) -> None:
        """Close the channel of the old certificate once its calls had ``grace`` to finish."""
        log.info(
            "%s dialed again with the renewed certificate: cert=%s old_channel_closes_in=%.0fs",
            self._what,
            self._cert,
            self._grace,
        )
        await old.close(grace=self._grace)


async def follow_renewals(
    redial_if_renewed: Callable[[], Awaitable[bool]], what: str, every: float = CHECK_SECONDS
) -> None:
    """Until cancelled: every ``every`` seconds, ``redial_if_renewed`` (a client's dial
    again, True if it did); a failure is logged and tried again at the next look."""
    while True:
        await asyncio.sleep(every)
        try:
            await redial_if_renewed()
        except Exception as error:
            log.warning("%s redial with the renewed certificate failed: error=%s", what, error)
