"""Across workers: each change is made, logged and counted once, whichever worker sees it first; a worker that
starts takes what the others know; without the shared cache each worker carries on with its own view."""

from __future__ import annotations

import asyncio
import logging

import pytest
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from resource_server.bootstrap import Runtime
from resource_server.status.base import UNPROBED, State
from resource_server.status.shared import Shared, endpoint_records
from tests.resource_server.status.conftest import (
    Clock,
    build_board,
    direct_route,
    fake_vllm,
    fixed_table,
)
from tests.servers import free_port

BOARD_LOGGER = "resource_server.status.board"


def _changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == BOARD_LOGGER]


async def test_two_workers_log_each_change_once_and_agree_on_since(
    runtime: Runtime, store: LocMemCache, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=BOARD_LOGGER)
    port = free_port()
    table = fixed_table(direct_route(7, f"http://127.0.0.1:{port}/v1"))
    first, second = (build_board(runtime, table, store=store, clock=clock) for _ in range(2))
    assert first.status(7) is UNPROBED

    with fake_vllm(port):
        await first.probe()
        clock.advance(10)
        await second.probe()
    started = clock.now - 10
    assert [first.status(7).state, second.status(7).state] == [State.LIVE, State.LIVE]
    assert first.status(7).since == second.status(7).since == started, "the first worker's since, for both"
    [live] = _changes(caplog)
    assert "endpoint 7 (demo-model on polaris) is live" in live

    clock.advance(20)
    await second.probe()  # the second worker notices first this time
    await first.probe()
    assert [first.status(7).state, second.status(7).state] == [State.OFFLINE, State.OFFLINE]
    assert first.status(7).since == second.status(7).since == started + 30
    offline = [record for record in caplog.records if record.name == BOARD_LOGGER][1:]
    assert [(record.levelno, "is offline (was live for 30 s)" in record.getMessage()) for record in offline] == [
        (logging.WARNING, True)
    ]

    clock.advance(5)
    with fake_vllm(port):
        await first.probe()
        await second.probe()
    assert len(_changes(caplog)) == 3, "back to live: one line more"
    for board in (first, second):
        seconds = board.metrics()[7].seconds_in_state
        assert (seconds["live"], seconds["offline"]) == (30, 5)


async def test_a_worker_that_starts_takes_the_states_the_others_share(
    runtime: Runtime, store: LocMemCache, clock: Clock
) -> None:
    port = free_port()
    table = fixed_table(direct_route(7, f"http://127.0.0.1:{port}/v1"))
    running = build_board(runtime, table, store=store, clock=clock)
    with fake_vllm(port):
        await running.probe()

    started = build_board(runtime, table, store=store, clock=clock)
    await started.adopt()
    assert (started.status(7).state, started.status(7).since) == (State.LIVE, running.status(7).since)
    clock.advance(3 * 3600 + 1)  # three rounds (an hour each here) with no worker writing it
    late = build_board(runtime, table, store=store, clock=clock)
    await late.adopt()
    assert late.status(7) is UNPROBED, "a record no worker keeps up says nothing now"
    # The admin reads the same records.
    assert endpoint_records([7, 8], Shared(store))[7].state is State.LIVE


async def test_requests_turned_away_cold_are_counted_across_workers(
    runtime: Runtime, store: LocMemCache, clock: Clock
) -> None:
    table = fixed_table(direct_route(7, f"http://127.0.0.1:{free_port()}/v1"))
    first, second = (build_board(runtime, table, store=store, clock=clock) for _ in range(2))
    await first.probe()
    first.turned_away(7)
    first.turned_away(7)
    second.turned_away(7)
    assert first.metrics()[7].turned_away == 2, "its own, not yet shared"
    await first.probe()
    await second.probe()
    assert second.metrics()[7].turned_away == 3
    await first.probe()
    assert first.metrics()[7].turned_away == 3


async def test_without_the_shared_cache_each_worker_keeps_its_own_view_and_says_so_once(
    runtime: Runtime, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    unreachable = RedisCache(f"redis://127.0.0.1:{free_port()}/0", {})  # nothing listens there
    port = free_port()
    table = fixed_table(direct_route(7, f"http://127.0.0.1:{port}/v1"))
    board = build_board(runtime, table, store=Shared(unreachable), clock=clock)
    with fake_vllm(port):
        await board.probe()
        clock.advance(30)
        await board.probe()
    assert (board.status(7).state, board.status(7).since) == (State.LIVE, clock.now - 30)
    clock.advance(30)
    await board.probe()
    assert (board.status(7).state, board.status(7).since) == (State.OFFLINE, clock.now)
    assert board.metrics()[7].seconds_in_state["live"] == 60
    outage = [record for record in caplog.records if "shared cache is unavailable" in record.getMessage()]
    assert len(outage) == 1


async def test_wait_for_change_returns_when_a_state_changes_in_this_worker_else_at_its_timeout(
    runtime: Runtime, store: LocMemCache, clock: Clock
) -> None:
    port = free_port()
    board = build_board(runtime, fixed_table(direct_route(7, f"http://127.0.0.1:{port}/v1")), store=store, clock=clock)
    assert await board.wait_for_change(0.01) is False

    waiter = asyncio.ensure_future(board.wait_for_change(30))
    with fake_vllm(port):
        await board.probe()
    assert await waiter is True

    waiter = asyncio.ensure_future(board.wait_for_change(0.2))
    with fake_vllm(port):
        await board.probe()  # still live: no change
    assert await waiter is False


async def test_a_window_in_the_routing_table_makes_it_maintenance_with_its_end(
    runtime: Runtime, store: LocMemCache, clock: Clock
) -> None:
    port = free_port()
    route = direct_route(7, f"http://127.0.0.1:{port}/v1", maintenance="Upgrades.", maintenance_ends=clock.now + 600)
    board = build_board(runtime, fixed_table(route), store=store, clock=clock)
    with fake_vllm(port):
        await board.probe()
    status = board.status(7)
    assert (status.state, status.maintenance_message, status.maintenance_ends) == (
        State.MAINTENANCE,
        "Upgrades.",
        clock.now + 600,
    )
    assert not status.serving


async def test_an_endpoint_gone_from_the_table_is_forgotten(runtime: Runtime, store: LocMemCache, clock: Clock) -> None:
    port = free_port()
    routes = [direct_route(7, f"http://127.0.0.1:{port}/v1"), direct_route(8, f"http://127.0.0.1:{port}/v1")]
    tables = [fixed_table(*routes), fixed_table(routes[0])]

    async def table() -> object:
        return await tables[0]()

    board = build_board(runtime, table, store=store, clock=clock)  # type: ignore[arg-type]
    with fake_vllm(port):
        await board.probe()
        assert board.model_card(8, "demo-model") is not None
        tables.pop(0)
        await board.probe()
    assert board.status(8) is UNPROBED and board.model_card(8, "demo-model") is None
    assert set(board.metrics()) == {7}
