"""What deploy/install.sh and deploy/demo.sh show: one line per step, the rest in a log they
name (deploy/steps.sh), and the demo's closing summary."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.migration import MIB, MigrationResult, summary
from tests.support.swarm import DrainResult, drain_summary

REPO = Path(__file__).resolve().parents[2]


def _steps(script: str, log: Path) -> subprocess.CompletedProcess[str]:
    """``script`` run by bash after ``steps_open demo LOG``, as the deploy scripts do."""
    return subprocess.run(
        [
            "bash",
            "-c",
            f'set -euo pipefail; source {REPO}/deploy/steps.sh; steps_open demo "$1"; {script}',
            "steps",
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_step_prints_one_line_and_logs_what_its_command_printed(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "demo.log"
    done = _steps(
        "noisy() { for i in $(seq 1 300); do echo apt line $i; done; echo warn >&2; }; "
        'step "installing system packages" noisy; echo after',
        log,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "after\n"
    assert done.stderr.startswith("demo: installing system packages... done (")
    assert done.stderr.count("\n") == 1
    kept = log.read_text()
    assert "apt line 1\n" in kept and "apt line 300\n" in kept and "warn\n" in kept


def test_a_failed_step_shows_the_logs_tail_and_path_and_stops(tmp_path: Path) -> None:
    log = tmp_path / "install.log"
    failed = _steps(
        "broken() { for i in $(seq 1 100); do echo pip line $i; done; false; echo not here; }; "
        'step "ferry and its Python packages" broken; echo "never reached"',
        log,
    )
    assert failed.returncode == 1
    assert "never reached" not in failed.stdout
    assert "ferry and its Python packages... FAILED (exit 1" in failed.stderr
    assert "    pip line 100\n" in failed.stderr and "pip line 50\n" not in failed.stderr
    assert f"the full log is {log}" in failed.stderr
    # The function's failing command stopped it, although bash runs it as a step.
    assert "not here" not in log.read_text()


def _migration(found: int, problems: tuple[str, ...] = ()) -> MigrationResult:
    return MigrationResult(
        rows_committed=4210,
        rows_found=found,
        checksum_committed="abc",
        checksum_found="abc" if found == 4210 else "def",
        pause_seconds=2.314,
        volume_bytes=64 * MIB,
        precopied_bytes=58 * MIB,
        moved_bytes=61 * MIB + MIB // 5,
        recovery_problems=problems,
    )


def test_the_demo_ends_with_rows_pause_and_bytes() -> None:
    lines = summary(_migration(4210)).splitlines()
    assert lines[0] == "== summary"
    assert "rows written: 4210  rows found after the move: 4210  (checksum matches)" in lines[1]
    assert lines[2].startswith("pause: 2.31 s")
    assert lines[3].startswith("moved: 61.2 MiB sent (58.0 MiB of it pre-copied")
    assert lines[-1] == "result: every committed row is there"


def test_the_demo_summary_says_when_rows_are_missing() -> None:
    text = summary(_migration(4200, ("invalid record length",)))
    assert "checksum DIFFERS" in text and "recovery problems: invalid record length" in text
    assert text.endswith("result: FAILED")


def test_the_swarm_demo_ends_with_one_line_per_drain() -> None:
    first = DrainResult(1000, 1000, 7.5, "host1", "host2", "host2", 40 * MIB, ())
    back = DrainResult(2000, 2000, 3.25, "host2", "host1", "host2", 2 * MIB, ())
    lines = drain_summary((first, back)).splitlines()
    assert lines[1].startswith("drain onto a fresh node (host1 -> host2): rows written: 1000")
    assert "reschedule (drain to first query): 7.50 s  moved: 40.0 MiB" in lines[1]
    assert lines[2].endswith("NOT INTACT")  # the owner is not where the task runs
    assert lines[-1] == "result: FAILED"
