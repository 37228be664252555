"""Structured logs: one line per event, ``key=value`` pairs after a fixed prefix."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Log to stderr as ``time level logger message`` (messages carry key=value context)."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
