"""Connections awaiting admission: the cap per peer address, and one log line per interval."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from agent.transfer import data
from agent.transfer.data import DataListener
from agent.transfer.unadmitted import Unadmitted


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "closed before admission" in r.getMessage()]


def test_a_peer_gets_its_share_and_the_rest_is_turned_away() -> None:
    unadmitted = Unadmitted(per_peer=3, total=5)
    assert [unadmitted.enter("10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert [unadmitted.enter("10.0.0.2") for _ in range(3)] == [True, True, False]
    unadmitted.leave("10.0.0.1")
    assert unadmitted.enter("10.0.0.2")
    assert not unadmitted.enter("10.0.0.3")


def test_drops_are_one_line_at_once_then_one_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    unadmitted = Unadmitted(interval=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(500):
            unadmitted.drop("10.0.0.9", "no_token_in_time")
        assert len(summaries(caplog)) == 1
        clock.now += 30
        unadmitted.drop("10.0.0.8", "no_ticket")
        unadmitted.summarize()
        lines = summaries(caplog)
    assert len(lines) == 2
    assert "count=1 " in lines[0] and "peers=10.0.0.9=1" in lines[0]
    assert "count=500 " in lines[1]
    assert "10.0.0.9=499" in lines[1] and "10.0.0.8=1" in lines[1]
    assert "no_ticket=1" in lines[1] and "no_token_in_time=499" in lines[1]


def test_a_quiet_interval_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Unadmitted().summarize()
    assert summaries(caplog) == []


async def test_the_listener_closes_connections_over_the_cap_at_once_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = DataListener("127.0.0.1", 0, None, Unadmitted(per_peer=4))
    await listener.start()

    def flood() -> tuple[int, list[socket.socket]]:
        idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(40)]
        closed = 0
        for sock in idle:
            sock.settimeout(1.0)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        return closed, idle

    try:
        with caplog.at_level(logging.WARNING):
            closed, idle = await asyncio.to_thread(flood)
            for sock in idle:
                sock.close()
            ticket = listener.expect("127.0.0.1", "ct-send", encrypted=False)
            await asyncio.sleep(data.TOKEN_READ_SECONDS + 0.5)  # the 4 admitted ones time out
            sender = await data.connect("127.0.0.1", listener.port, ticket.token)
            with sender:
                assert isinstance(await ticket.connection(), socket.socket)
    finally:
        await listener.close()
    assert closed == 36
    assert len(summaries(caplog)) == 1
