"""``--watch`` for ferryctl's reads: a table redrawn in place, or one JSON line per change.

ferryctl talks only to control. ``move status --watch`` rides control's
``WatchVolume`` stream; ``volume list --watch`` polls ``ListVolumes`` (one
etcd read per key prefix) every ``--interval`` seconds, so control keeps no
per-watcher state and a restarted control is simply polled again
(docs/operations.md says why).

On a terminal the table is redrawn in place (rich's ``Live``); to a pipe each
changed table is printed whole. ``-o json`` prints one object per line for
each row that changed (a row that went away: ``{"name": ..., "deleted":
true}``), ``-o yaml`` one document per change; Ctrl-C ends it with status 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click
import yaml
from rich.console import Console, RenderableType
from rich.live import Live

Row = dict[str, Any]


class Display:
    """Where watched rows go, as ``output`` asks; ``show`` is called with every new state."""

    def __init__(
        self,
        output: str,
        key: str,
        table: Callable[[list[Row]], RenderableType],
        console: Console,
    ) -> None:
        self._output = output
        self._key = key
        self._table = table
        self._console = console
        self._shown: dict[str, Row] | None = None
        self._live: Live | None = None

    def __enter__(self) -> Display:
        if self._output == "table" and self._console.is_terminal:
            self._live = Live(console=self._console, auto_refresh=False, transient=False)
            self._live.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def show(self, rows: list[Row]) -> None:
        current = {str(row[self._key]): row for row in rows}
        if current == self._shown:
            return
        before, self._shown = self._shown or {}, current
        if self._output == "table":
            if self._live is not None:
                self._live.update(self._table(rows), refresh=True)
            else:
                self._console.print(self._table(rows))
                self._console.print()
            return
        changed: list[Row] = [row for name, row in current.items() if before.get(name) != row]
        changed += [{self._key: name, "deleted": True} for name in before if name not in current]
        for row in changed:
            if self._output == "json":
                click.echo(json.dumps(row, sort_keys=True))
            else:
                click.echo("---\n" + yaml.safe_dump(row, sort_keys=True), nl=False)


def follow(display: Display, states: Iterable[list[Row]]) -> None:
    """Show each state until the states end or Ctrl-C."""
    try:
        with display:
            for rows in states:
                display.show(rows)
    except KeyboardInterrupt:
        pass


def every(
    seconds: float, read: Callable[[], list[Row]], sleep: Callable[[float], None]
) -> Iterator[list[Row]]:
    """``read()`` now and then every ``seconds``, for ever."""
    while True:
        yield read()
        sleep(seconds)
