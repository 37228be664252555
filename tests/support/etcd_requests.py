"""Watch what a client asks etcd: count its KV requests, or slip a write in after one.

``KvRecorder`` replaces an ``aetcd.Client``'s KV stub (the one every read,
write and transaction goes through) with a wrapper: each call is counted by
method (``Range``, ``Txn``, ``Put``, ``DeleteRange``), and a write armed with
``after_next`` runs once the next request returned, before the caller sees
the reply: exactly the moment between two reads of a multi-read path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd


class KvRecorder:
    """Counts ``client``'s KV requests; runs an armed write after the next one."""

    def __init__(self, client: aetcd.Client) -> None:
        self.counts: Counter[str] = Counter()
        self._client = client
        self._stub: Any = None
        self._armed: Callable[[], Awaitable[object]] | None = None

    async def install(self) -> KvRecorder:
        await self._client.connect()
        self._stub = self._client.kvstub
        self._client.kvstub = self
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()

    def after_next(self, write: Callable[[], Awaitable[object]]) -> None:
        """Run ``write`` (on another client) once the next request of this one returned."""
        self._armed = write

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        call = getattr(self._stub, method)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[method] += 1
            reply = await call(*args, **kwargs)
            if self._armed is not None:
                write, self._armed = self._armed, None
                await write()
            return reply

        return counted
