"""The libzfs_core backend: OpenZFS's own Python binding, where the kernel module runs.

Used when ``import libzfs_core`` works and ``/dev/zfs`` exists (Debian's
``python3-pyzfs`` on kernel OpenZFS, e.g. the Vagrant nodes). It raises the
binding's own exception classes; ``agent.zfs.exceptions`` mirrors their names
and this module re-raises them as Ferry's classes, so callers catch one set.
What libzfs_core lacks (properties, listing, mount) comes from the CLI backend.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from agent.zfs import exceptions as exc

F = TypeVar("F", bound=Callable[..., Any])


def available() -> bool:
    """True when the kernel module and the binding are both there."""
    if not os.path.exists("/dev/zfs"):
        return False
    try:
        import libzfs_core  # noqa: F401
    except ImportError:
        return False
    return True


def _translated(function: F) -> F:
    """Re-raise the binding's exceptions as the same-named classes of agent.zfs.exceptions."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            ours = getattr(exc, type(error).__name__, None)
            if ours is None or not isinstance(ours, type) or not issubclass(ours, exc.ZFSError):
                raise
            if issubclass(ours, exc.MultipleOperationsFailure):
                raise ours(getattr(error, "errors", [])) from error
            translated = ours(getattr(error, "name", None))
            raise translated from error

    return call  # type: ignore[return-value]


def functions() -> dict[str, Callable[..., Any]]:
    """The lzc_* functions of the binding, translated; only called when available()."""
    import libzfs_core

    names = [
        "lzc_create",
        "lzc_snapshot",
        "lzc_destroy_snaps",
        "lzc_exists",
        "lzc_send",
        "lzc_receive",
        "lzc_send_space",
        "lzc_hold",
        "lzc_release",
        "lzc_get_holds",
        "lzc_rollback",
        "lzc_rollback_to",
        "lzc_rename",
        "lzc_clone",
        "lzc_promote",
        "lzc_destroy",
    ]
    return {
        name: _translated(getattr(libzfs_core, name))
        for name in names
        if hasattr(libzfs_core, name)
    }
