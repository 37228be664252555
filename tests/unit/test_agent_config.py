"""The agent's settings: the Docker plugin cannot run without ferry-control's address."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig


def config(**changes: object) -> AgentConfig:
    settings: dict[str, object] = {
        "node": "az-host1",
        "etcd": ("127.0.0.1:2379",),
        "pool": "az-pool",
        "listen": "127.0.0.1:7480",
        "advertise": "127.0.0.1:7480",
        "data_port": 7481,
        "mount_root": Path("/tmp/az-mnt"),
        "plugin_socket": Path("/tmp/az-ferry.sock"),
        "tls": None,
        "control": "127.0.0.1:7070",
    }
    return AgentConfig(**{**settings, **changes})  # type: ignore[arg-type]


def test_the_plugin_needs_the_control_address_and_says_which_flag() -> None:
    with pytest.raises(ValueError, match="--control is required: ferry-control's HOST:PORT"):
        config(control="")
    assert config().control == "127.0.0.1:7070"
    assert config(control="", plugin_socket=None).plugin_socket is None


def test_a_lease_ttl_too_short_for_the_self_fence_is_refused_with_the_range() -> None:
    with pytest.raises(ValueError, match="--lease-ttl 3: give 5 to 600 seconds"):
        config(lease_ttl=3)
    assert config(lease_ttl=30).lease_ttl == 30
