"""The command-line flags ferry-agent and ferry-control share: TLS files, etcd prefix, log level.

One block, so the two programs cannot drift apart in a flag's name, default or
meaning (the etcd prefix default, say, which both must agree on to see the same
keys). Each program says only whose certificate its ``--tls-cert`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from ferry.cluster.keyspace import DEFAULT_PREFIX

F = TypeVar("F", bound=Callable[..., object])
LOG_LEVELS = ("debug", "info", "warning")


def service_flags(cert_help: str, key_help: str) -> Callable[[F], F]:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--insecure``, ``--etcd-prefix`` and
    ``--log-level``, with the program's words for whose certificate and key they are."""
    options = (
        click.option("--tls-ca", default="", help="Cluster CA certificate (PEM)."),
        click.option("--tls-cert", default="", help=cert_help),
        click.option("--tls-key", default="", help=key_help),
        click.option("--insecure", is_flag=True, help="No TLS (development only; says so loudly)."),
        click.option(
            "--etcd-prefix", default=DEFAULT_PREFIX, help="Key prefix of Ferry's state in etcd."
        ),
        click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS)),
    )

    def apply(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return apply
