"""A command in a real pseudo-terminal, its screen output collected as it comes."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Mapping, Sequence

COLUMNS, ROWS = 200, 50
# Cursor up (rich's Live moves back over what it drew to redraw it in place).
CURSOR_UP = "\x1b[1A"


class Terminal:
    """``argv`` with a pty as its stdin, stdout and stderr, COLUMNS wide."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        main, child = os.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self._main = main
        self.process = subprocess.Popen(
            list(argv),
            stdin=child,
            stdout=child,
            stderr=child,
            env={**env, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS)},
            start_new_session=True,
        )
        os.close(child)
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._main, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk)

    @property
    def screen(self) -> str:
        """Everything written so far, escape sequences included."""
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} not on the terminal; it shows:\n{self.screen}")
            time.sleep(0.2)

    def interrupt(self, timeout: float = 10.0) -> int:
        """Ctrl-C, as the terminal sends it; the exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            self._reader.join(timeout)
            os.close(self._main)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
