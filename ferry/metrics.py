"""The ``/metrics`` endpoint of ferry-agent and ferry-control (Prometheus text format).

Off unless ``--metrics-address HOST:PORT`` is given. With the program's TLS
files it is HTTPS and asks for a client certificate from the cluster CA (any
kind: a scraper gets one with ``ferryctl ca issue``), as every other port of
Ferry does; ``tls`` is asked for the context at each handshake, so a renewed
certificate is served without a restart. A program run ``--insecure`` serves
plain HTTP (docs/operations.md).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from ferry.security.certificates import CertificateWatch
from ferry.security.tls import TlsFiles

log = logging.getLogger(__name__)

PATH = "/metrics"


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ValueError saying how to write it."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(
            f"--metrics-address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9480); "
            "leave it empty to serve no metrics"
        )
    return host.strip("[]"), int(port)


def contexts(files: TlsFiles, watch: CertificateWatch | None) -> Callable[[], ssl.SSLContext]:
    """The endpoint's server contexts: made anew after each renewal ``watch`` sees (never the
    watch's own contexts, which other ports share), or once from ``files`` without a watch."""
    made: dict[int, ssl.SSLContext] = {}

    def current() -> ssl.SSLContext:
        generation = -1
        if watch is not None:
            watch.check()
            generation = watch.generation
        if generation not in made:
            made.clear()
            made[generation] = files.ssl_context(ssl.Purpose.CLIENT_AUTH)
        return made[generation]

    return current


def following(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """A server context that hands each handshake to ``current()`` (a renewal's context)."""
    first = current()

    def pick(sock: ssl.SSLObject, _name: str | None, _first: ssl.SSLContext) -> None:
        latest = current()
        if latest is not sock.context:
            sock.context = latest

    first.sni_callback = pick
    return first


async def serve_metrics(
    registry: CollectorRegistry,
    address: str,
    tls: Callable[[], ssl.SSLContext] | None,
) -> web.AppRunner:
    """Serve ``registry`` at ``http(s)://address/metrics`` until the runner is cleaned up."""
    host, port = parse_address(address)
    app = web.Application()
    app.router.add_get(PATH, make_aiohttp_handler(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=following(tls) if tls else None)
    await site.start()
    log.info(
        "metrics serving: address=%s path=%s tls=%s",
        address,
        PATH,
        "on (client certificate from the cluster CA required)" if tls else "OFF (insecure)",
    )
    return runner
