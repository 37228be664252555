"""The metric names: the code's (agent/metrics.py, control/metrics.py), the dashboard's
(deploy/grafana-dashboard.json) and the docs' (docs/operations.md) are the same set, and
follow Prometheus's conventions."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent import metrics as agent_metrics
from control import metrics as control_metrics

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bferry_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _families(registry: CollectorRegistry) -> dict[str, str]:
    """Each family's name as Prometheus shows it (counters with _total) and its type."""
    found = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = family.type
    return found


FAMILIES = {**_families(agent_metrics.REGISTRY), **_families(control_metrics.REGISTRY)}


def _samples(name: str, kind: str) -> set[str]:
    base = name.removesuffix("_total")
    return {base + suffix for suffix in SUFFIXES[kind]}


def _dashboard_names() -> set[str]:
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    return {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in NAME.findall(target["expr"])
    }


def test_the_dashboard_uses_every_metric_and_only_metrics_the_code_exports() -> None:
    used = _dashboard_names()
    exported = set().union(*(_samples(name, kind) for name, kind in FAMILIES.items()))
    assert used - exported == set(), "the dashboard queries metrics no program exports"
    unused = {name for name, kind in FAMILIES.items() if not _samples(name, kind) & used}
    assert unused == set(), "metrics without a dashboard panel"


def test_the_docs_list_exactly_the_exported_metrics() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(ferry_[a-z0-9_]+)`", text, re.MULTILINE))
    assert documented == set(FAMILIES)


def test_names_follow_prometheus_conventions() -> None:
    for name, kind in FAMILIES.items():
        assert name.startswith("ferry_")
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
