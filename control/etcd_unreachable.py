"""Every RPC of ferry-control answers UNAVAILABLE with advice while etcd cannot be reached.

Without this, a call made while etcd restarts or is cut off ended with gRPC's
"Unexpected <class 'aetcd.exceptions.ConnectionFailedError'>" (UNKNOWN), and
``ferryctl`` could not tell a retryable outage from a bug.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

log = logging.getLogger(__name__)

UNREACHABLE = (ConnectionFailedError, ConnectionTimeoutError)


def advice(method: str, error: Exception) -> str:
    return (
        f"ferry-control cannot reach etcd ({type(error).__name__}); nothing was changed "
        f"unless the call said so before: check that etcd runs and answers "
        f"(etcdctl endpoint health), then retry {method.rsplit('/', 1)[-1]}"
    )


class EtcdUnreachable(grpc.aio.ServerInterceptor):
    """Turns aetcd's connection errors into UNAVAILABLE, logged once per call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_streaming(method, handler.unary_stream))
        return handler


async def _abort(method: str, error: Exception, context: grpc.aio.ServicerContext) -> None:
    log.warning("etcd unreachable: method=%s error=%s", method.lstrip("/"), error)
    await context.abort(grpc.StatusCode.UNAVAILABLE, advice(method, error))


def _unary(method: str, behaviour: Any) -> Any:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except UNREACHABLE as error:
            await _abort(method, error, context)

    return guarded


def _streaming(method: str, behaviour: Any) -> Any:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for reply in behaviour(request, context):
                yield reply
        except UNREACHABLE as error:
            await _abort(method, error, context)

    return guarded
