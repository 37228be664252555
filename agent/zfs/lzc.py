"""The libzfs_core backend: OpenZFS's own Python binding, where the kernel module runs.

Used when ``import libzfs_core`` works and ``/dev/zfs`` exists (Debian's
``python3-pyzfs`` on kernel OpenZFS, e.g. the Vagrant nodes). It raises the
binding's own exception classes; ``agent.zfs.exceptions`` mirrors their names
and this module re-raises them as Ferry's classes, so callers catch one set.
What libzfs_core lacks (properties, listing, mount) comes from the CLI backend,
and so do create and clone: ``zfs create`` mounts the new filesystem and turns
property strings (``compression=gzip``) into the numbers the kernel takes,
while ``lzc_create`` does neither, and the API promises a mounted filesystem.

Each call is bounded like a command (``runner.call``): it runs in a thread
of its own under the limit of its kind; past it the caller gets
``CommandTimeout`` and the thread, which no signal can stop inside an ioctl,
is left to finish, listed among the running commands and logged when it
returns.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from agent.zfs import exceptions as exc
from agent.zfs import runner
from agent.zfs.names import validate

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


def _ours(error: Exception) -> Exception:
    """The same-named class of agent.zfs.exceptions for a binding exception, else ``error``."""
    ours = getattr(exc, type(error).__name__, None)
    if not isinstance(ours, type) or not issubclass(ours, exc.ZFSError):
        return error
    if issubclass(ours, exc.MultipleOperationsFailure):
        inner = [_ours(e) for e in getattr(error, "errors", [])]
        return ours(
            [e for e in inner if isinstance(e, exc.ZFSError)],
            getattr(error, "suppressed_count", 0),
        )
    translated = ours(None)
    translated.name = _text(getattr(error, "name", None))
    translated.errno = getattr(error, "errno", None) or translated.errno
    return translated


def _text(name: object) -> str | None:
    return name.decode() if isinstance(name, bytes) else None if name is None else str(name)


def _names(value: Any) -> Any:
    """Names as the binding wants them: validated bytes (in lists and dict keys too)."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        return validate(value)
    if isinstance(value, dict):
        return {validate(key): _tags(tags) for key, tags in value.items()}
    return [validate(item) for item in value]


def _tags(tags: Any) -> Any:
    if isinstance(tags, str):
        return tags.encode()
    if isinstance(tags, list | tuple):
        return [_tags(tag) for tag in tags]
    return tags


def _translated(function: F, name: str, name_args: int) -> F:
    """Validate the first ``name_args`` arguments as names; run the call bounded by the
    runner; raise Ferry's exception classes."""
    kind = _KINDS.get(name, runner.Kind.CHANGE)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        converted = [_names(a) for a in args[:name_args]] + list(args[name_args:])
        subject = _subject(converted[0]) if converted else None
        try:
            return runner.call(
                (name, subject) if subject else (name,),
                subject,
                kind,
                lambda: function(*converted, **kwargs),
                fd=_stream_fd(name, args, kwargs),
            )
        except exc.ZFSError:
            raise  # Ferry's own already: CommandTimeout
        except Exception as error:
            ours = _ours(error)
            if ours is error:
                raise
            raise ours from error

    return call  # type: ignore[return-value]


def _subject(names: Any) -> str | None:
    """The name a call is about, for the running list and messages: its first name."""
    if isinstance(names, bytes):
        return names.decode()
    first = next(iter(names or ()), None)
    return first.decode() if isinstance(first, bytes) else None


# How long each call may take (the runner's kinds); the rest are changes.
_KINDS = {
    "lzc_exists": runner.Kind.READ,
    "lzc_get_holds": runner.Kind.READ,
    "lzc_send_space": runner.Kind.READ,
    "lzc_send": runner.Kind.STREAM,
    "lzc_receive": runner.Kind.STREAM,
    "lzc_receive_resumable": runner.Kind.STREAM,
}
# Where a stream call takes its descriptor: its progress is measured there.
_FD_ARG = {"lzc_send": 2, "lzc_receive": 1, "lzc_receive_resumable": 1}


def _stream_fd(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    position = _FD_ARG.get(name)
    if position is None:
        return None
    if "fd" in kwargs:
        return int(kwargs["fd"])
    return int(args[position]) if len(args) > position else None


# How many leading arguments of each binding function are dataset or snapshot names.
_NAME_ARGS = {
    "lzc_snapshot": 1,
    "lzc_destroy_snaps": 1,
    "lzc_exists": 1,
    "lzc_send": 2,
    "lzc_receive": 1,
    "lzc_receive_resumable": 1,
    "lzc_send_space": 2,
    "lzc_hold": 1,
    "lzc_release": 1,
    "lzc_get_holds": 1,
    "lzc_rollback": 1,
    "lzc_rollback_to": 2,
    "lzc_rename": 2,
    "lzc_promote": 1,
    "lzc_destroy": 1,
    "lzc_bookmark": 1,
    "lzc_destroy_bookmarks": 1,
}


def _text_keys(holds: dict[bytes, int]) -> dict[str, int]:
    """Hold tags as ``str``, the way the CLI backend lists them."""
    return {tag.decode(): created for tag, created in holds.items()}


def _release_result(missing: list[bytes]) -> list[bytes]:
    """The binding lists a tag a snapshot did not have as ``snap#tag`` among the missing
    snapshots; the API raises HoldNotFound for it, as the CLI backend does, so a
    caller cannot take a release that did nothing for one that happened."""
    absent_tags = [entry for entry in missing if b"#" in entry]
    if absent_tags:
        raise exc.HoldReleaseFailure(
            [exc.HoldNotFound(entry.split(b"#", 1)[0]) for entry in absent_tags]
        )
    return missing


# Results the binding returns in another shape than the API's.
_RESULTS: dict[str, Callable[[Any], Any]] = {
    "lzc_get_holds": _text_keys,
    "lzc_release": _release_result,
}


def functions() -> dict[str, Callable[..., Any]]:
    """The lzc_* functions of the binding, translated; only called when available()."""
    import libzfs_core

    found = {}
    for name, count in _NAME_ARGS.items():
        if not hasattr(libzfs_core, name):
            continue
        function = _translated(getattr(libzfs_core, name), name, count)
        if name in _RESULTS:
            function = _reshaped(function, _RESULTS[name])
        found[name] = function
    return found


def _reshaped(function: F, shape: Callable[[Any], Any]) -> F:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        return shape(function(*args, **kwargs))

    return call  # type: ignore[return-value]
