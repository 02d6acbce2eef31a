"""Leaving the pool drains it; cancelling the task around it cancels cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import anyio
import pytest

import scheduler
from scheduler.testing import FakeClock, FakeTransport, ok
from scheduler.transport import Response

pytestmark = pytest.mark.anyio


async def test_leaving_the_pool_waits_for_every_submitted_job() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    results: list[scheduler.Result] = []
    async with clock.autojump(), scheduler.Pool(transport=transport, clock=clock, model="m",
                              limits=scheduler.Limits(rpm=60)) as pool:
        for i in range(3):
            asyncio.ensure_future(pool.submit(f"q{i}", max_tokens=5)).add_done_callback(
                lambda f: results.append(f.result()))
        await asyncio.sleep(0)
        # The pool paced them a second apart, and did not close before the last one.
    assert transport.sent_at == [0.0, 1.0, 2.0]
    assert pool.statistics().succeeded == 3


async def test_cancelling_the_enclosing_task_cancels_in_flight_requests() -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def never_answers(endpoint: str, body: Mapping[str, Any]) -> Response:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return ok()

    async def run() -> None:
        async with scheduler.Pool(transport=FakeTransport(never_answers), model="m") as pool:
            await pool.submit("hangs", max_tokens=5)

    with anyio.fail_after(10):  # a bound on a hang, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            tg.cancel_scope.cancel()
    assert cancelled.is_set()
