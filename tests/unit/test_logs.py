"""--log-format json: one object per line, each key=value of a message a field of its own."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from ferry.logs import JsonFormatter


def _format(message: str, *args: object, exc: bool = False) -> dict[str, object]:
    record = logging.LogRecord("agent.moves", logging.INFO, __file__, 1, message, args, None)
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            record.exc_info = sys.exc_info()
    return dict(json.loads(JsonFormatter().format(record)))


def test_a_message_becomes_its_event_and_its_fields() -> None:
    entry = _format(
        "handed off: volume=%s from=%s to=%s writes_stopped_for=%.2fs",
        "pg",
        "host1",
        "host2",
        0.31,
    )
    assert entry["level"] == "info" and entry["logger"] == "agent.moves"
    assert entry["event"] == "handed off"
    assert entry["message"] == "handed off: volume=pg from=host1 to=host2 writes_stopped_for=0.31s"
    assert (entry["volume"], entry["from"], entry["to"]) == ("pg", "host1", "host2")
    assert entry["writes_stopped_for"] == "0.31s"
    assert str(entry["time"]).endswith("Z")


def test_a_value_with_spaces_runs_to_the_next_key_and_reserved_keys_keep_their_place() -> None:
    entry = _format("move attempt failed: volume=v error=no route to host level=3 retry_in=2.0s")
    assert entry["error"] == "no route to host"
    assert entry["level"] == "info" and entry["level_"] == "3"
    assert entry["retry_in"] == "2.0s"


def test_an_exception_is_one_field() -> None:
    entry = _format("command observer failed: argv=%s", "zfs list", exc=True)
    assert "RuntimeError: boom" in str(entry["exception"])


def test_control_logs_json_lines_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "control.log"
    with log.open("w") as err:
        control = subprocess.Popen(
            [sys.executable, "-c", "from control.server import main; main()",
             "--etcd", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--insecure",
             "--log-format", "json"],
            stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "INSECURE" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        control.terminate()
        control.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("INSECURE MODE" in str(line["message"]) for line in lines), log.read_text()
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


def test_a_message_without_pairs_is_just_its_message() -> None:
    entry = _format("agent stopped")
    assert entry["message"] == "agent stopped" and "event" not in entry
