"""The command-line flags ferry-agent and ferry-control share: TLS files, etcd prefix, metrics
address, log level and format.

One block, so the two programs cannot drift apart in a flag's name, default or
meaning (the etcd prefix default, say, which both must agree on to see the same
keys). Each program says only whose certificate its ``--tls-cert`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from ferry.cluster.keyspace import DEFAULT_PREFIX
from ferry.logs import FORMATS

F = TypeVar("F", bound=Callable[..., object])
LOG_LEVELS = ("debug", "info", "warning")


def service_flags(cert_help: str, key_help: str) -> Callable[[F], F]:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--insecure``, ``--etcd-prefix``,
    ``--metrics-address``, ``--log-level`` and ``--log-format``, with the program's words for
    whose certificate and key they are."""
    options = (
        click.option("--tls-ca", default="", help="Cluster CA certificate (PEM)."),
        click.option("--tls-cert", default="", help=cert_help),
        click.option("--tls-key", default="", help=key_help),
        click.option("--insecure", is_flag=True, help="No TLS (development only; says so loudly)."),
        click.option(
            "--etcd-prefix", default=DEFAULT_PREFIX, help="Key prefix of Ferry's state in etcd."
        ),
        click.option(
            "--metrics-address",
            default="",
            help="HOST:PORT of the Prometheus /metrics endpoint (HTTPS with this program's "
            "certificate; clients need one from the cluster CA); empty: no metrics. Loopback "
            "unless a scraper elsewhere needs it (docs/operations.md).",
        ),
        click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS)),
        click.option(
            "--log-format",
            default="text",
            type=click.Choice(FORMATS),
            help="text: time level logger message key=value...; json: one object per line, "
            "each key=value a field.",
        ),
    )

    def apply(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return apply
