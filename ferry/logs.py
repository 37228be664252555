"""Structured logs: one line per event, ``key=value`` pairs after a fixed prefix, or JSON.

``text``: ``time level logger message``, the message an event name then
``key=value`` pairs (``handed off: volume=pg from=a ...``). ``json``: one
object per line for log shippers, with ``time``, ``level``, ``logger``, the
whole ``message``, the ``event`` (the message up to its first ``: ``), each
``key=value`` pair of the message as a field of its own (a value runs up to
the next `` key=``), and ``exception`` when one was logged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

FORMATS = ("text", "json")
_PAIR = re.compile(r"(?:^|\s)([a-z_][a-z0-9_]*)=")
_RESERVED = {"time", "level", "logger", "message", "event", "exception"}


class JsonFormatter(logging.Formatter):
    """A record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        entry.update(_fields(message))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _fields(message: str) -> dict[str, str]:
    """The event name and the ``key=value`` pairs of a message."""
    found: dict[str, str] = {}
    event, colon, _rest = message.partition(": ")
    if colon and "=" not in event:
        found["event"] = event
    pairs = list(_PAIR.finditer(message))
    ends = [following.start() for following in pairs[1:]] + [len(message)] * bool(pairs)
    for pair, end in zip(pairs, ends, strict=True):
        key = pair.group(1)
        value = message[pair.end() : end].rstrip(" ;,")
        found[f"{key}_" if key in _RESERVED else key] = value
    return found


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr, as text (``time level logger message``) or JSON lines."""
    if log_format not in FORMATS:
        raise ValueError(f"--log-format {log_format!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
