"""Every keyspace operation timed, for whoever watches (the agent's metrics).

``timed_operations`` wraps each public coroutine method of a class (the
``Keyspace``): once it ends, every observer added with ``add_observer`` is told
its name, how long it took and whether it raised. An operation that calls
another (``purge_volume`` reading first) is one operation: only the outermost
call is observed, so the time of a read is not counted twice, once under each
name. Watches (async generators) are streams without a duration and are left
as they are.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

Observer = Callable[[str, float, bool], None]
"""Called with (operation name, seconds, True if it raised)."""

C = TypeVar("C", bound=type)

_observers: list[Observer] = []
_inside: ContextVar[bool] = ContextVar("ferry_keyspace_operation", default=False)


def add_observer(observer: Observer) -> None:
    """Tell ``observer`` of every operation from now on (once, however often it is added)."""
    if observer not in _observers:
        _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    _observers.remove(observer)


def timed_operations(cls: C) -> C:
    """``cls`` with each public coroutine method observed (see the module's docstring)."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _timed(name, member))
    return cls


def _timed(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        if _inside.get() or not _observers:
            return await method(*args, **kwargs)
        token = _inside.set(True)
        started = time.monotonic()
        failed = True
        try:
            result = await method(*args, **kwargs)
            failed = False
            return result
        finally:
            _inside.reset(token)
            seconds = time.monotonic() - started
            for observer in _observers:
                observer(name, seconds, failed)

    return timed
