"""Mutual TLS from the cluster CA, for control, agents and ferryctl alike.

Every party presents a certificate issued by the cluster CA (``ferryctl ca``)
whose common name is its identity (a node's name, ``control``, a user), and
requires one from its peer. Clients verify servers by name
(``grpc.ssl_target_name_override``), not by address.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

INSECURE_WARNING = (
    "INSECURE MODE: no TLS, any client is accepted and any peer can claim any name; "
    "for development only (use 'ferryctl ca init' and 'ferryctl ca issue' for real clusters)"
)


@dataclass(frozen=True)
class TlsFiles:
    """The CA certificate a party trusts, and its own certificate and key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def _require(self) -> None:
        missing = [str(p) for p in (self.ca, self.cert, self.key) if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"TLS file(s) not found: {', '.join(missing)}; issue them with 'ferryctl ca issue'"
            )

    def _read(self) -> tuple[bytes, bytes, bytes]:
        self._require()
        return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server side: client certificates from the cluster CA are required."""
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )

    def ssl_context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        """Mutual TLS for a plain socket: ``CLIENT_AUTH`` to serve, ``SERVER_AUTH`` to dial.

        Either side requires the other's certificate from the cluster CA; a
        client checks the server's name with ``server_hostname``.
        """
        self._require()
        context = ssl.create_default_context(purpose, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def from_flags(ca: str, cert: str, key: str, insecure: bool) -> TlsFiles | None:
    """The TLS files a service was given, None for --insecure; ValueError if incomplete."""
    if insecure:
        return None
    if not (ca and cert and key):
        raise ValueError(
            "give --tls-ca, --tls-cert and --tls-key (see 'ferryctl ca issue'), "
            "or --insecure for development"
        )
    return TlsFiles(Path(ca), Path(cert), Path(key))


def endpoints(text: str) -> tuple[str, ...]:
    """``HOST:PORT,HOST:PORT`` as a tuple, blanks dropped."""
    return tuple(e.strip() for e in text.split(",") if e.strip())


def certificate_name(certificate: dict[str, object] | None) -> str | None:
    """The common name in a peer certificate as ``ssl`` reports it (``getpeercert()``)."""
    for rdn in (certificate or {}).get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The common name of the peer's verified client certificate, or None without one."""
    names = list(context.auth_context().get("x509_common_name") or [])
    return names[0].decode() if names else None


def warn_insecure() -> None:
    log.warning(INSECURE_WARNING)
