"""The door of every RPC that ferry-control and the agents serve: ``ferry.security.authz.RULES``.

A server interceptor, so an RPC nobody wrote a check for is refused (the
table is default deny) instead of open to any certificate the CA signed.
Each mutating call is logged with who asked, before it runs; each refusal
with why. On a server started with ``--insecure`` every caller is let in
as kind ``insecure`` (and logged so). Every call's end is told to the
``observe`` callback (metrics): method, caller kind (``none`` when the caller
had no usable certificate), gRPC status code name, and seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from ferry.security.authz import INSECURE, RULES, Caller, NoKind, caller_from_certificate, refusal
from ferry.security.calls import CallInterceptor

log = logging.getLogger(__name__)

CallObserver = Callable[[str, str, str, float], None]
"""Told of each call's end: method, caller kind, status code name, seconds."""
NO_KIND = "none"


class KindGate(CallInterceptor):
    """Admits a call only if ``ferry.security.authz`` lets the caller's certificate kind make it."""

    def __init__(self, insecure: bool, observe: CallObserver | None = None) -> None:
        self._insecure = insecure
        self._observe = observe

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who is calling; NoKind if the certificate cannot be authorized."""
        return caller_of(context, self._insecure)

    async def admit(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        call: _Call | None = None,
    ) -> Caller:
        """The caller, if it may call ``method``; otherwise the call is aborted with the reason.
        ``call`` learns the caller's kind before any refusal."""
        volume, node = _field(request, "name") or _field(request, "volume"), _field(request, "node")
        try:
            caller = self.caller(context)
            if call is not None:
                call.kind = caller.kind
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

    @asynccontextmanager
    async def around(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """The call runs only if admitted; its end, or its error, is told to the observer."""
        call = _Call(method, self._observe)
        try:
            await self.admit(method, request, context, call)
            yield
        except BaseException as error:
            call.end(context, error)
            raise
        call.end(context, None)


class _Call:
    """One call as its observer hears of it."""

    def __init__(self, method: str, observe: CallObserver | None) -> None:
        self.method = method.lstrip("/")
        self.kind = NO_KIND
        self._observe = observe
        self._started = time.monotonic()

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        if self._observe is None:
            return
        code = _status(context.code())
        if error is not None and code == grpc.StatusCode.OK:
            # Raised without an abort: gRPC answers UNKNOWN (or the call was cancelled).
            cancelled = isinstance(error, asyncio.CancelledError)
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        self._observe(self.method, self.kind, code.name, time.monotonic() - self._started)


def _status(code: object) -> grpc.StatusCode:
    """The status a context holds (a StatusCode, its number, or None before any is set)."""
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.OK


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
