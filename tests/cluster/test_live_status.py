"""``volume list --watch`` and ``move status --watch`` through a move, as an operator sees them:
in a real terminal (redrawn in place), and as JSON lines through a pipe."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster
from tests.support.terminal import CURSOR_UP, Terminal
from tests.support.volumes import mount_held, mountpoint, wait_for, write_random_on

pytestmark = pytest.mark.cluster


@pytest.fixture
def volume(cluster: Cluster) -> Iterator[str]:
    name = f"lv-{secrets.token_hex(3)}"
    first = cluster.hosts[0].name
    cluster.ferryctl(["volume", "create", name, "--size", "1G", "--node", first])
    wait_for(f"{name} owned by {first}", lambda: cluster.volume(name)["owner"] == first)
    yield name
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


class JsonLines:
    """A ``-o json --watch`` ferryctl through a pipe, its lines parsed as they come."""

    def __init__(self, cluster: Cluster, args: list[str]) -> None:
        self.process = subprocess.Popen(
            cluster.ferryctl_argv(args),
            stdout=subprocess.PIPE,
            text=True,
            env=cluster.ferryctl_environment(),
        )
        self.rows: list[dict[str, object]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.rows.append(json.loads(line))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._reader.join(10)


def test_watching_a_move_in_a_terminal_and_as_json_lines(cluster: Cluster, volume: str) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    write_random_on(cluster, a, f"{mountpoint(a, volume)}/data", 8)
    env = cluster.ferryctl_environment()
    listing = Terminal(
        cluster.ferryctl_argv(["volume", "list", "--watch", "--interval", "0.5"]), env
    )
    status = Terminal(cluster.ferryctl_argv(["move", "status", volume, "--watch"]), env)
    lines = JsonLines(cluster, ["move", "status", volume, "--watch", "-o", "json"])
    try:
        listing.wait_for(volume)
        status.wait_for(volume)
        with mount_held(cluster, volume, a.name):
            cluster.ferryctl(["volume", "move", volume, b.name])
            listing.wait_for(f"waiting_for_unmount {a.name}->{b.name}")
            status.wait_for("waiting_for_unmount")
        wait_for(f"{volume} owned by {b.name}", lambda: cluster.volume(volume)["owner"] == b.name)
        listing.wait_for(f"done {a.name}->{b.name}")
        status.wait_for("done")
        # Redrawn in place: before each table after the first, the cursor went back up over
        # the one before (a table per change printed below the last has no cursor moves).
        for terminal in (listing, status):
            tables = terminal.screen.count("NAME")
            assert tables > 2 and terminal.screen.count(CURSOR_UP) >= tables - 1, terminal.screen
        assert listing.interrupt() == 0
        assert status.interrupt() == 0
        wait_for(
            "the JSON lines to reach done",
            lambda: any(r.get("phase") == "done" for r in lines.rows),
        )
    finally:
        listing.kill()
        status.kill()
        lines.stop()
    phases = [row.get("phase") for row in lines.rows]
    assert "waiting_for_unmount" in phases and phases[-1] == "done", phases
    assert all(row["name"] == volume for row in lines.rows)
    assert len(phases) == len(lines.rows)
