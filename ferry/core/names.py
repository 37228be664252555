"""ZFS and volume name rules: pure checks, raising ``InvalidName`` with the rule broken.

A dataset name is ``pool/child/...``; a snapshot adds ``@snap``, a bookmark
``#mark``. Components use ``[A-Za-z0-9_.:-]`` (and space), are never empty,
``.`` or ``..``, the pool name starts with a letter, and the whole name fits
in 255 bytes. ``%`` is reserved by ZFS for temporary clones and never valid
here. A leading ``-`` would be read as an option by the ``zfs`` command.
"""

from __future__ import annotations

import re

MAX_NAME_BYTES = 255
_COMPONENT = re.compile(rb"^[A-Za-z0-9_.: -]+$")
_PARTS = re.compile(rb"^([^@#]*)(?:([@#])(.*))?$", re.DOTALL)

Name = bytes | str


class InvalidName(ValueError):
    """``name`` breaks a rule; ``reason`` says which, ``too_long`` marks the length rule."""

    def __init__(self, name: Name, reason: str, too_long: bool = False) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason
        self.too_long = too_long


def as_bytes(name: Name) -> bytes:
    """``name`` as bytes; str is encoded as UTF-8."""
    return name.encode() if isinstance(name, str) else bytes(name)


def _check_component(component: bytes, whole: bytes) -> None:
    if not component:
        raise InvalidName(whole, "Invalid name: empty component")
    if component in (b".", b".."):
        raise InvalidName(whole, "Invalid name: '.' or '..' component")
    if not _COMPONENT.match(component):
        raise InvalidName(whole, "Invalid name: characters outside [A-Za-z0-9_.: -]")


def validate(name: Name, kind: str = "any") -> bytes:
    """Check ``name`` by ZFS rules; ``kind`` is dataset, snapshot, bookmark or any."""
    raw = as_bytes(name)
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidName(raw, "Dataset name is too long", too_long=True)
    if not raw or b"\0" in raw:
        raise InvalidName(raw, "Invalid name: empty or contains NUL")
    if raw.startswith(b"-"):
        raise InvalidName(raw, "Invalid name: starts with '-'")
    if b"%" in raw:
        raise InvalidName(raw, "Invalid name: '%' is reserved")
    if raw.count(b"@") + raw.count(b"#") > 1:
        raise InvalidName(raw, "Invalid name: more than one '@' or '#'")
    parts = _PARTS.match(raw)
    assert parts is not None  # the pattern matches any string without two separators
    dataset, sep, tail = parts.group(1), parts.group(2) or b"", parts.group(3) or b""
    expected = {"dataset": b"", "snapshot": b"@", "bookmark": b"#"}.get(kind)
    if expected is not None and sep != expected:
        raise InvalidName(raw, f"Invalid name: not a {kind} name")
    for component in dataset.split(b"/"):
        _check_component(component, raw)
    if not dataset[:1].isalpha():
        raise InvalidName(raw, "Invalid name: the pool name must start with a letter")
    if sep:
        _check_component(tail, raw)
    return raw


def validate_dataset(name: Name) -> bytes:
    return validate(name, "dataset")


def validate_snapshot(name: Name) -> bytes:
    return validate(name, "snapshot")


def validate_under(name: Name, root: Name) -> bytes:
    """Check ``name`` and that it lies under the dataset ``root`` (a snapshot of it counts)."""
    raw = validate(name)
    base = validate_dataset(root)
    dataset = re.split(rb"[@#]", raw, maxsplit=1)[0]
    if dataset != base and not dataset.startswith(base + b"/"):
        raise InvalidName(raw, f"Invalid name: outside {base.decode()}")
    return raw


_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_volume_name(name: str) -> str:
    """A Ferry volume name: Docker's volume name rules, which are also one ZFS component."""
    if not isinstance(name, str) or not _VOLUME.match(name):
        raise InvalidName(
            name,
            "Invalid volume name: use 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit",
        )
    return name
