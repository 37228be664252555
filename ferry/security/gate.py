"""The door of every RPC that ferry-control and the agents serve: ``ferry.security.authz.RULES``.

A server interceptor, so an RPC nobody wrote a check for is refused (the
table is default deny) instead of open to any certificate the CA signed.
Each mutating call is logged with who asked, before it runs; each refusal
with why. On a server started with ``--insecure`` every caller is let in
as kind ``insecure`` (and logged so).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ferry.security.authz import INSECURE, RULES, Caller, NoKind, caller_from_certificate, refusal

log = logging.getLogger(__name__)


class KindGate(grpc.aio.ServerInterceptor):
    """Admits a call only if ``ferry.security.authz`` lets the caller's certificate kind make it."""

    def __init__(self, insecure: bool) -> None:
        self._insecure = insecure

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who is calling; NoKind if the certificate cannot be authorized."""
        return caller_of(context, self._insecure)

    async def admit(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Caller:
        """The caller, if it may call ``method``; otherwise the call is aborted with the reason."""
        volume, node = _field(request, "name") or _field(request, "volume"), _field(request, "node")
        try:
            caller = self.caller(context)
        except NoKind as error:
            log.warning(
                "call refused: peer=%s method=%s volume=%s reason=%s",
                context.peer(),
                method.lstrip("/"),
                volume,
                error,
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
            raise  # abort raises; this only tells the type checker
        reason = refusal(method, caller)
        if reason is not None:
            await self.refuse(context, caller, method, volume, reason)
        rule = RULES.get(method)
        if rule is not None and rule.mutating:
            log.info(
                "call: caller=%s kind=%s method=%s volume=%s node=%s",
                caller.name,
                caller.kind,
                method.lstrip("/"),
                volume,
                node,
            )
        return caller

    @staticmethod
    async def refuse(
        context: grpc.aio.ServicerContext, caller: Caller, method: str, volume: str, reason: str
    ) -> None:
        """Log who was refused what, and end the call with PERMISSION_DENIED and ``reason``."""
        log.warning(
            "call refused: caller=%s kind=%s method=%s volume=%s reason=%s",
            caller.name,
            caller.kind,
            method.lstrip("/"),
            volume,
            reason,
        )
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

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
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self.admit(method, request, context)
            return await behaviour(request, context)

        return admitted

    def _streaming(self, method: str, behaviour: Any) -> Any:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self.admit(method, request, context)
            async for reply in behaviour(request, context):
                yield reply

        return admitted


def caller_of(context: grpc.aio.ServicerContext, insecure: bool) -> Caller:
    """The caller's name and kind from its verified client certificate; NoKind without one."""
    if insecure:
        return Caller(context.peer(), INSECURE)
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    if not pems:
        raise NoKind("a client certificate from the cluster CA is required")
    return caller_from_certificate(pems[0])


def _field(request: Any, name: str) -> str:
    """A string field of a request message, empty where the message has none."""
    return str(getattr(request, name, "") or "")
