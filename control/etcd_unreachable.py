"""Every RPC of ferry-control answers UNAVAILABLE with advice while etcd cannot be reached.

Without this, a call made while etcd restarts or is cut off ended with gRPC's
"Unexpected <class 'aetcd.exceptions.ConnectionFailedError'>" (UNKNOWN), and
``ferryctl`` could not tell a retryable outage from a bug.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from ferry.security.calls import CallInterceptor

log = logging.getLogger(__name__)

UNREACHABLE = (ConnectionFailedError, ConnectionTimeoutError)


def advice(method: str, error: Exception) -> str:
    return (
        f"ferry-control cannot reach etcd ({type(error).__name__}); nothing was changed "
        f"unless the call said so before: check that etcd runs and answers "
        f"(etcdctl endpoint health), then retry {method.rsplit('/', 1)[-1]}"
    )


class EtcdUnreachable(CallInterceptor):
    """Turns aetcd's connection errors into UNAVAILABLE, logged once per call."""

    @asynccontextmanager
    async def around(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        try:
            yield
        except UNREACHABLE as error:
            log.warning("etcd unreachable: method=%s error=%s", method.lstrip("/"), error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, advice(method, error))
