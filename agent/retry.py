"""Exponential back-off with jitter for retries against etcd, peers and ZFS."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``first`` up to ``cap`` seconds, each with +-20 % jitter."""

    def __init__(self, first: float = 0.5, cap: float = 15.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self._first
