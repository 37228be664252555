"""What every test run prints at its end: the tests skipped, by reason; and the
deselection of tests marked ``slow`` unless FERRY_SLOW_TESTS=1 asks for them.

A real part an integration test needs (zpool, etcd, dockerd, root) that is
absent fails the test: a green run never hides an untested layer. The skips
left are for what this machine's ZFS cannot do (kernel OpenZFS only, or
zfs-fuse only) and cluster shapes the caller chose; each is counted here.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from _pytest.terminal import TerminalReporter


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests are left out (deselected, not skipped) unless FERRY_SLOW_TESTS=1."""
    if os.environ.get("FERRY_SLOW_TESTS") == "1":
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: Counter[str] = Counter()
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    terminalreporter.section(f"{len(skipped)} skipped, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.line(f"{count:4d}  {reason}")
