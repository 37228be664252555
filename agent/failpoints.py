"""Named points where the agent can be made to die on purpose, for fault tests.

``FERRY_FAILPOINTS=transfer.sent,handoff.before_cas`` makes the agent
exit at once (as ``kill -9`` would: no clean-up, no etcd writes) when it
reaches one of the named points. Unset in production.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

EXIT_CODE = 137


def reached(name: str) -> None:
    """Die here if the operator armed this failpoint."""
    armed = os.environ.get("FERRY_FAILPOINTS", "")
    if name in armed.split(","):
        log.error("failpoint reached, exiting now: failpoint=%s", name)
        logging.shutdown()
        os._exit(EXIT_CODE)
