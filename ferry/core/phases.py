"""The phases of a move, and the one table of which phase may follow which, written by whom.

Every rule about phases derives from ``TRANSITIONS``: which phases are under
way (``ACTIVE_PHASES``), which ended (``ENDED_PHASES``), who may write a
change, and the check each record writer makes before its compare-and-swap
(``check``). A writer reads the record, builds the next one and writes it
only while the record is at the revision it read, so checking against the
phase it read is checking against what etcd holds. docs/replication.md shows
the table; a unit test keeps it equal to this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MovePhase(StrEnum):
    PENDING = "pending"
    PRECOPY = "precopy"
    WAITING_FOR_UNMOUNT = "waiting_for_unmount"
    HANDOFF = "handoff"
    ACTIVATING = "activating"
    DONE = "done"
    FAILED = "failed"


class Writer(StrEnum):
    """The party that writes a transition."""

    SOURCE = "source agent"
    TARGET = "target agent"
    CONTROL = "control"


@dataclass(frozen=True)
class Transition:
    before: MovePhase | None
    """None: no move record, or a new move replacing an ended one."""
    after: MovePhase
    writer: Writer
    why: str


_P = MovePhase
_UNDER_WAY = (_P.PENDING, _P.PRECOPY, _P.WAITING_FOR_UNMOUNT, _P.HANDOFF)

TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, _P.PENDING, Writer.CONTROL, "a move is requested"),
    Transition(
        _P.ACTIVATING, _P.PENDING, Writer.CONTROL, "a move on from the new owner, not yet writable"
    ),
    *(
        Transition(before, _P.PRECOPY, Writer.SOURCE, why)
        for before, why in (
            (_P.PENDING, "the source starts sending"),
            (_P.WAITING_FOR_UNMOUNT, "a retried attempt pre-copies again"),
            (_P.HANDOFF, "the handoff missed its deadline, or the target needs a full stream"),
        )
    ),
    *(
        Transition(before, _P.WAITING_FOR_UNMOUNT, Writer.SOURCE, why)
        for before, why in (
            (_P.PRECOPY, "the volume is in use on the source"),
            (_P.HANDOFF, "it was mounted again, or a file is open for writing at the freeze"),
        )
    ),
    *(
        Transition(before, _P.HANDOFF, Writer.SOURCE, "nothing uses the volume; the delta is small")
        for before in (_P.PRECOPY, _P.WAITING_FOR_UNMOUNT)
    ),
    Transition(_P.HANDOFF, _P.ACTIVATING, Writer.SOURCE, "ownership moved to the target"),
    Transition(_P.ACTIVATING, _P.DONE, Writer.TARGET, "the target's copy is writable"),
    Transition(
        _P.HANDOFF, _P.DONE, Writer.TARGET, "the same, the source having died right after the swap"
    ),
    *(
        Transition(before, _P.FAILED, Writer.CONTROL, "cancelled: the volume stays on its source")
        for before in _UNDER_WAY
    ),
    *(
        Transition(before, before, Writer.SOURCE, "progress, an error, the final snapshot")
        for before in (*_UNDER_WAY, _P.ACTIVATING)
    ),
)

ACTIVE_PHASES = frozenset(
    t.before
    for t in TRANSITIONS
    if (t.after, t.writer) == (_P.FAILED, Writer.CONTROL) and t.before is not None
)
"""A move is under way, and may be cancelled, until the ownership swap."""

ENDED_PHASES = frozenset(MovePhase) - {
    t.before for t in TRANSITIONS if t.before is not None and t.before != t.after
}
"""Nothing follows but a new move."""


class IllegalTransition(ValueError):
    """A writer tried a change of phase the table does not allow."""


def writer_of(before: MovePhase | None, after: MovePhase) -> Writer | None:
    """Who may write ``before`` -> ``after``; None when nobody may."""
    if before in ENDED_PHASES:
        before = None  # a new move replaces an ended one
    for transition in TRANSITIONS:
        if (transition.before, transition.after) == (before, after):
            return transition.writer
    return None


def check(before: MovePhase | None, after: MovePhase, writer: Writer) -> None:
    """IllegalTransition unless ``writer`` may change a move in ``before`` to ``after``."""
    allowed = writer_of(before, after)
    if allowed is not writer:
        was = before.value if before is not None else "(no move)"
        by = f"only the {allowed.value} writes it" if allowed else "no step of a move does that"
        raise IllegalTransition(
            f"a move in {was} cannot become {after.value} by the {writer.value}: {by}"
        )
