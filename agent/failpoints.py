"""Named points where the agent can be made to die or hang on purpose, for fault tests.

``FERRY_FAILPOINTS=transfer.sent,handoff.before_cas`` makes the agent
exit at once (as ``kill -9`` would: no clean-up, no etcd writes) when it
reaches one of the named points. ``hang:<command words>`` (e.g.
``hang:sync`` or ``hang:zfs list -H -o name -t snapshot``) makes every
outside command that starts with those words hang instead of running, the
way a command stuck on a hung filesystem does (see ``agent.zfs.runner``).
Unset in production.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

EXIT_CODE = 137
HANG_PREFIX = "hang:"


def _armed() -> list[str]:
    return [point.strip() for point in os.environ.get("FERRY_FAILPOINTS", "").split(",")]


def reached(name: str) -> None:
    """Die here if the operator armed this failpoint."""
    if name in _armed():
        log.error("failpoint reached, exiting now: failpoint=%s", name)
        logging.shutdown()
        os._exit(EXIT_CODE)


def hangs(argv: Sequence[str]) -> bool:
    """True if a ``hang:`` failpoint names the start of this command."""
    for point in _armed():
        if point.startswith(HANG_PREFIX):
            words = point[len(HANG_PREFIX) :].split()
            if words and list(argv[: len(words)]) == words:
                return True
    return False
