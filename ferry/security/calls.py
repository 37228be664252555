"""Every call of a gRPC service run inside one async context: the door of a server interceptor.

A ``CallInterceptor`` says what happens around each call (``around``: before
it, and on its end or its error); this module puts that around all four
kinds of handler, unary and streaming alike, so no kind of RPC slips past.
The gate (``ferry.security.gate``) and control's etcd guard
(``control.etcd_unreachable``) are both one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call of the server inside ``around(method, request, context)``.

    For a client-streaming call ``request`` is the iterator of its requests.
    An exception ``around`` raises ends the call with it; one it swallows is
    not allowed (the handler would return nothing): raise or abort instead.
    """

    @abstractmethod
    def around(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AbstractAsyncContextManager[None]:
        """What runs around one call of ``method``."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(method, handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(method, handler.stream_unary))
        return handler._replace(stream_stream=self._streaming(method, handler.stream_stream))

    def _unary(self, method: str, behaviour: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self.around(method, request, context):
                return await behaviour(request, context)

        return wrapped

    def _streaming(self, method: str, behaviour: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self.around(method, request, context):
                async for reply in behaviour(request, context):
                    yield reply

        return wrapped
