"""The move phases' transition table: the rules derived from it, and its copy in the docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core import phases
from ferry.core.phases import ACTIVE_PHASES, ENDED_PHASES, MovePhase, Writer

DOC = Path(__file__).resolve().parents[2] / "docs" / "replication.md"
BEGIN, END = "<!-- transitions: begin -->", "<!-- transitions: end -->"


def table() -> str:
    rows = ["| from | to | written by | when |", "|---|---|---|---|"]
    for t in phases.TRANSITIONS:
        before = t.before.value if t.before is not None else "(none, or an ended move)"
        rows.append(f"| {before} | {t.after.value} | {t.writer.value} | {t.why} |")
    return "\n".join(rows)


def test_the_docs_show_the_table_the_code_enforces() -> None:
    text = DOC.read_text()
    shown = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert shown == table(), f"docs/replication.md is stale; put between its markers:\n{table()}"


def test_a_move_is_under_way_until_the_swap_and_ends_done_or_failed() -> None:
    assert {
        MovePhase.PENDING,
        MovePhase.PRECOPY,
        MovePhase.WAITING_FOR_UNMOUNT,
        MovePhase.HANDOFF,
    } == ACTIVE_PHASES
    assert {MovePhase.DONE, MovePhase.FAILED} == ENDED_PHASES


def test_every_phase_is_reachable_and_every_unended_phase_has_a_way_out() -> None:
    reached = {t.after for t in phases.TRANSITIONS}
    assert reached == set(MovePhase)
    for phase in set(MovePhase) - ENDED_PHASES:
        assert any(t.before == phase and t.after != phase for t in phases.TRANSITIONS), phase


@pytest.mark.parametrize(
    ("before", "after", "writer"),
    [
        (MovePhase.PRECOPY, MovePhase.DONE, Writer.TARGET),  # done before the handoff
        (MovePhase.ACTIVATING, MovePhase.FAILED, Writer.CONTROL),  # cancel after the swap
        (MovePhase.HANDOFF, MovePhase.ACTIVATING, Writer.TARGET),  # only the source swaps
        (MovePhase.FAILED, MovePhase.PRECOPY, Writer.SOURCE),  # a cancelled move resumed
        (MovePhase.DONE, MovePhase.DONE, Writer.SOURCE),
        (None, MovePhase.PRECOPY, Writer.SOURCE),  # no move requested
    ],
)
def test_a_writer_is_refused_a_change_the_table_does_not_give_it(
    before: MovePhase | None, after: MovePhase, writer: Writer
) -> None:
    with pytest.raises(phases.IllegalTransition):
        phases.check(before, after, writer)


def test_a_new_move_replaces_an_ended_or_handed_off_one_only_by_control() -> None:
    for ended in ENDED_PHASES:
        phases.check(ended, MovePhase.PENDING, Writer.CONTROL)
    with pytest.raises(phases.IllegalTransition):
        phases.check(MovePhase.PRECOPY, MovePhase.PENDING, Writer.CONTROL)
    # Ownership has moved: the new owner may be moved on before its activation wrote done.
    phases.check(MovePhase.ACTIVATING, MovePhase.PENDING, Writer.CONTROL)


def test_every_transition_in_the_table_is_allowed_to_its_writer_only() -> None:
    for t in phases.TRANSITIONS:
        phases.check(t.before, t.after, t.writer)
        for other in set(Writer) - {t.writer}:
            with pytest.raises(phases.IllegalTransition):
                phases.check(t.before, t.after, other)
