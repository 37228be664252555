"""The ZFS door's name checks: ``ferry.core.names``' rules, failing as pyzfs does.

Every name is checked before any command runs; a broken rule raises
``NameInvalid`` (or ``NameTooLong``), the errors pyzfs callers expect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from agent.zfs.exceptions import NameInvalid, NameTooLong
from ferry.core import names as rules
from ferry.core.names import Name, as_bytes

P = ParamSpec("P")
T = TypeVar("T")

__all__ = [
    "Name",
    "as_bytes",
    "validate",
    "validate_dataset",
    "validate_snapshot",
    "validate_under",
    "validate_volume_name",
]


def _as_zfs_error(check: Callable[P, T]) -> Callable[P, T]:
    def checked(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return check(*args, **kwargs)
        except rules.InvalidName as broken:
            if broken.too_long:
                raise NameTooLong(as_bytes(broken.name)) from None
            raise NameInvalid(broken.name, broken.reason) from None

    checked.__doc__ = check.__doc__
    return checked


validate = _as_zfs_error(rules.validate)
validate_dataset = _as_zfs_error(rules.validate_dataset)
validate_snapshot = _as_zfs_error(rules.validate_snapshot)
validate_under = _as_zfs_error(rules.validate_under)
validate_volume_name = _as_zfs_error(rules.validate_volume_name)
