"""A party's TLS files, watched: its certificate's expiry, and credentials that follow a renewal.

Renewing a certificate is writing new files at the same paths. A
``CertificateWatch`` notices (size, mtime, inode of the three files; looked
at no more than once per CHECK_SECONDS), checks that the new certificate
and key belong together and come from the CA, and only then serves them:
gRPC server credentials ask it at each handshake, TLS contexts are made
anew, and ``generation`` tells holders of client credentials to dial again
(peers, and the etcd client: ``ferry.cluster.etcd_tls``).
A renewal caught half-written (a new certificate with the old key) keeps
the old files in service and is tried again at the next look, so nothing
stops serving while an operator copies files.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ferry.security.tls import TlsFiles

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
NEAR_EXPIRY_SECONDS = 30 * 86400.0

Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Loaded:
    """The files' contents as they were when checked."""

    ca: bytes
    cert: bytes
    key: bytes
    not_after: float
    signature: Signature


def not_after(cert_pem: bytes) -> float:
    """The certificate's expiry, as a Unix time."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()


class CertificateWatch:
    """The current TLS files of one party; ``check`` picks up a renewal."""

    def __init__(self, files: TlsFiles, clock: Callable[[], float] = time.monotonic) -> None:
        self.files = files
        self._clock = clock
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._loaded = self._load()
        self._checked = clock()
        self.generation = 0
        self._contexts: dict[ssl.Purpose, ssl.SSLContext] = {}

    @property
    def not_after(self) -> float:
        return self.check().not_after

    def check(self) -> Loaded:
        """The files in service, after a look for a renewal if the last look is old enough."""
        with self._lock:
            if self._clock() - self._checked >= CHECK_SECONDS:
                self._checked = self._clock()
                self._reload_if_changed()
            return self._loaded

    def _reload_if_changed(self) -> None:
        try:
            if self._signature() == self._loaded.signature:
                return
            loaded = self._load()
        except (OSError, ValueError, InvalidSignature) as error:
            log.warning(
                "renewed TLS files not usable yet, still serving the previous ones: cert=%s "
                "error=%s; write the certificate and its key (from the cluster CA) at their paths",
                self.files.cert,
                error,
            )
            return
        self._loaded = loaded
        self._contexts.clear()
        self.generation += 1
        log.info(
            "TLS certificate renewed, in use now: cert=%s not_after=%s",
            self.files.cert,
            _iso(loaded.not_after),
        )

    def _signature(self) -> Signature:
        stats = [Path(p).stat() for p in (self.files.ca, self.files.cert, self.files.key)]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> Loaded:
        """Read and prove the files: the key opens the certificate and the CA signed it."""
        signature = self._signature()
        ca, cert, key = (
            Path(p).read_bytes() for p in (self.files.ca, self.files.cert, self.files.key)
        )
        self.files.ssl_context(ssl.Purpose.CLIENT_AUTH)  # raises on a key that does not match
        x509.load_pem_x509_certificate(cert).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca)
        )
        if self._signature() != signature:
            raise ValueError("the files changed while they were read")
        return Loaded(ca, cert, key, not_after(cert), signature)

    def context(
        self, purpose: ssl.Purpose, narrow: Callable[[ssl.SSLContext], ssl.SSLContext]
    ) -> ssl.SSLContext:
        """A TLS context from the files in service (made once per renewal), narrowed."""
        self.check()
        with self._lock:
            if purpose not in self._contexts:
                self._contexts[purpose] = narrow(self.files.ssl_context(purpose))
            return self._contexts[purpose]

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC client credentials from the files in service; a renewal needs a new channel
        (``generation`` says when)."""
        loaded = self.check()
        return grpc.ssl_channel_credentials(
            root_certificates=loaded.ca, private_key=loaded.key, certificate_chain=loaded.cert
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials that take up a renewal at the next handshake."""
        served = [self.check()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            current = self.check()
            if current is served[0]:
                return None
            served[0] = current
            return _configuration(current)

        # gRPC keeps the configuration in use when the fetcher returns None; its stubs say
        # the fetcher must always return one.
        return grpc.dynamic_ssl_server_credentials(
            _configuration(served[0]),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    def log_expiry(self) -> None:
        """One line at start: when the certificate expires; a warning when that is near."""
        expiry = self.not_after
        left = expiry - time.time()
        if left < NEAR_EXPIRY_SECONDS:
            log.warning(
                "TLS certificate expires soon: cert=%s not_after=%s days_left=%.1f; issue a new "
                "one ('ferryctl ca issue') and write it at the same paths: it is taken up "
                "without a restart (docs/deploy.md)",
                self.files.cert,
                _iso(expiry),
                left / 86400,
            )
        else:
            log.info(
                "TLS certificate: cert=%s not_after=%s days_left=%.0f",
                self.files.cert,
                _iso(expiry),
                left / 86400,
            )


def _configuration(loaded: Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(loaded.key, loaded.cert)], root_certificates=loaded.ca
    )


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
