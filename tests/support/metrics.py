"""Scraping a Ferry /metrics endpoint as Prometheus would: HTTPS with a certificate from the
cluster CA (the operator's), or plain HTTP on an insecure cluster."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from ferry.security.tls import TlsFiles
from tests.support.cluster import Cluster

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]
SCRAPE_TIMEOUT_SECONDS = 10.0


def scrape_cluster(cluster: Cluster, address: str) -> Samples:
    """``scrape`` with the cluster's operator certificate (plain HTTP on an insecure one)."""
    if cluster.insecure:
        return scrape(address, None)
    assert cluster.tls_ca and cluster.user_cert and cluster.user_key
    return scrape(address, TlsFiles(cluster.tls_ca, cluster.user_cert, cluster.user_key))


def scrape(address: str, tls: TlsFiles | None) -> Samples:
    """Every sample at ``address``/metrics: (name, labels) -> value."""
    context = None
    scheme = "http"
    if tls is not None:
        scheme = "https"
        context = tls.ssl_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False  # the certificate names the node, not its address
    with urllib.request.urlopen(
        f"{scheme}://{address}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS, context=context
    ) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample of ``name`` with exactly ``labels``; None when there is none (a gauge
    that is absent is not a gauge at 0)."""
    return samples.get((name, frozenset(labels.items())))
