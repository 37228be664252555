"""``ferryctl events``: what happened to a volume, newest last, written by whoever did it
(control, the source, the target), and followed live with ``--follow``."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from typing import Any

import pytest

from tests.support.cluster import Cluster
from tests.support.volumes import mount_held, mountpoint, wait_for, write_random_on

pytestmark = pytest.mark.cluster


def kept(cluster: Cluster, volume: str) -> list[dict[str, Any]]:
    out = cluster.ferryctl(["events", "--volume", volume, "-o", "json"]).stdout
    return list(json.loads(out))


def test_a_move_leaves_its_story_in_the_events(cluster: Cluster) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    volume = f"ev-{secrets.token_hex(3)}"
    follower = subprocess.Popen(
        cluster.ferryctl_argv(["events", "--follow", "--volume", volume, "-o", "json"]),
        stdout=subprocess.PIPE,
        text=True,
        env=cluster.ferryctl_environment(),
    )
    followed: list[dict[str, Any]] = []

    def read() -> None:
        assert follower.stdout is not None
        followed.extend(json.loads(line) for line in follower.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        cluster.ferryctl(["volume", "create", volume, "--size", "1G", "--node", a.name])
        wait_for(f"{volume} owned by {a.name}", lambda: cluster.volume(volume)["owner"] == a.name)
        write_random_on(cluster, a, f"{mountpoint(a, volume)}/data", 8)
        with mount_held(cluster, volume, a.name):
            cluster.ferryctl(["volume", "move", volume, b.name])
            wait_for(
                "the move to wait for the unmount",
                lambda: cluster.volume(volume)["move"]["phase"] == "waiting_for_unmount",
            )
        wait_for(
            "the move to be done",
            lambda: cluster.volume(volume).get("move", {}).get("phase") == "done",
        )
        wait_for(
            "the target's event", lambda: "moved" in [e["kind"] for e in kept(cluster, volume)]
        )
        story = kept(cluster, volume)
        wait_for("the follower to see it all", lambda: len(followed) >= len(story))
    finally:
        follower.terminate()
        follower.wait(10)
        reader.join(10)
        cluster.ferryctl(["volume", "delete", volume, "--force"], check=False)
    # A retried attempt adds a move_error (with why) between them; none is expected here.
    told = [e for e in story if e["kind"] != "move_error"]
    assert [e["kind"] for e in told] == ["created", "move_requested", "handed_off", "moved"], story
    assert [e["by"] for e in told] == ["control", "control", a.name, b.name], story
    handoff = told[2]
    assert 0 < float(handoff["pause_seconds"]) < 30, handoff
    assert f"{a.name} -> {b.name}" in str(handoff["detail"])
    assert [float(e["at"]) for e in story] == sorted(float(e["at"]) for e in story)
    assert followed[: len(story)] == story
    assert "deleted" in [e["kind"] for e in kept(cluster, volume)]
