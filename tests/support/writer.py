"""A writer like a database's: appends numbered lines, fsyncs each, prints each acknowledged one.

``python -m tests.support.writer FILE [--hold]``: with ``--hold`` the file
stays open for writing (a database's WAL); without it, each line opens,
appends, fsyncs and closes. Every line printed as ``ok N`` was fsynced
(acknowledged); a refused write prints ``err N <errno>`` and the writer
goes on trying, so a test sees exactly when writes stopped. ``start_writer`` runs it
on a cluster host; ``acknowledged`` and ``lines_in`` read what it said and wrote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start_writer(path: str, hold: bool, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """This writer on ``path``, run through ``prefix`` (a cluster host's run prefix: the host's
    network namespace, the agent's own mount namespace); its stdout is piped."""
    argv = [sys.executable, "-m", "tests.support.writer", path, *(["--hold"] if hold else [])]
    return subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, text=True, cwd=REPO)


def acknowledged(output: str) -> set[int]:
    """The numbers of the lines a writer said were fsynced (``ok N``)."""
    return {int(line.split()[1]) for line in output.splitlines() if line.startswith("ok ")}


def lines_in(log: str) -> set[int]:
    """The numbers of the lines a writer's file holds (``line N``)."""
    return {int(line.split()[1]) for line in log.splitlines() if line.startswith("line ")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    held = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if args.hold else None
    number = 0
    while True:
        try:
            fd = (
                held
                if held is not None
                else os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            )
            try:
                os.write(fd, f"line {number}\n".encode())
                os.fsync(fd)
            finally:
                if held is None:
                    os.close(fd)
            print(f"ok {number}", flush=True)
        except OSError as error:
            print(f"err {number} {error.errno}", flush=True)
        number += 1
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
