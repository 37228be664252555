"""Every metric ferry-control exports, defined once (names: docs/operations.md, the dashboard:
deploy/grafana-dashboard.json; tests/unit/test_metric_names.py keeps the three in step)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()

RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RPCS = Counter(
    "ferry_control_rpcs_total",
    "Control API calls, by method, caller's certificate kind and gRPC status.",
    ["method", "caller_kind", "result"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "ferry_control_rpc_duration_seconds",
    "Control API calls until their answer, by method.",
    ["method"],
    buckets=RPC_BUCKETS,
    registry=REGISTRY,
)


def observe_call(method: str, caller_kind: str, result: str, seconds: float) -> None:
    """The gate's observer (ferry.security.gate.CallObserver)."""
    RPCS.labels(method, caller_kind, result).inc()
    RPC_DURATION.labels(method).observe(seconds)
