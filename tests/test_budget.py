"""A spending budget: admission stops before spent + reserved worst-case cost would pass it."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping
from typing import Any

import pytest
from tiktoken_encodings import needs_encoding

import scheduler
from scheduler.testing import FakeClock, FakeTransport, error, ok
from scheduler.transport import Response

pytestmark = pytest.mark.anyio

# $0.001 an input token, $0.002 an output token: a request with usage 10 + 5 costs $0.02.
PRICES = {"budget-model": {"input": 1000.0, "output": 2000.0}}
COST = 10 * 0.001 + 5 * 0.002


def make_pool(transport: FakeTransport, clock: FakeClock, **kwargs: Any) -> scheduler.Pool:
    kwargs.setdefault("limits", scheduler.Limits(rpm=60_000))
    return scheduler.Pool(transport=transport, clock=clock, model="budget-model", prices=PRICES,
                          rng=random.Random(1), **kwargs)


def slow_ok(clock: FakeClock) -> Any:
    async def answer(endpoint: str, body: Mapping[str, Any]) -> Response:
        await clock.sleep(1.0)
        return ok(prompt_tokens=10, completion_tokens=5)

    return answer


@needs_encoding("o200k_base")  # the arithmetic below rests on the prompt's tiktoken count (9 tokens)
async def test_the_budget_stops_admission_at_exactly_the_right_request() -> None:
    clock = FakeClock()
    transport = FakeTransport(slow_ok(clock), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=1.0) as pool:
        body = {"model": "budget-model", "max_tokens": 50, "messages": [{"role": "user", "content": "q0"}]}
        prompt = pool.estimator.estimate("/v1/chat/completions", body) - 50
        results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=50, custom_id=f"r{i:02}",
                                                     raise_errors=False) for i in range(60)))
        stats = pool.statistics()
    # Each admission holds its worst case until its real cost ($0.02) replaces it: the prompt bounded by its
    # text's UTF-8 bytes ("user" and "q0") plus 8 a message and 16 (no tokenizer counts more), at the input
    # price, and 50 output tokens at the output price. The n-th job is admitted while (n - 1) * cost + worst
    # <= budget.
    bound = max(prompt, len("user") + len("q0") + 8 + 16)
    worst = bound * 0.001 + 50 * 0.002
    admitted = math.floor((1.0 - worst) / COST) + 1
    assert prompt == 9 and bound == 30 and admitted == 44
    assert len(transport.calls) == admitted
    assert [r.custom_id for r in results if r.ok] == [f"r{i:02}" for i in range(admitted)]
    assert all(r.error is not None and r.error.code == "budget_exhausted" for r in results[admitted:])
    assert stats.cost_usd == pytest.approx(admitted * COST) and stats.cost_usd <= 1.0
    assert stats.reserved_usd == 0.0 and stats.budget_usd == 1.0
    assert stats.stopped is not None and "budget" in stats.stopped
    # Reservations let several run at once: seven fit the budget at the start.
    assert transport.sent_at[:8] == [0.0] * 7 + [1.0]


async def test_after_the_stop_later_jobs_fail_at_once_without_a_call() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: ok(prompt_tokens=10, completion_tokens=5), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=0.16) as pool:
        done = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=50, raise_errors=False) for i in range(5)))
        with pytest.raises(scheduler.BudgetExhausted) as caught:
            await pool.submit("later", max_tokens=50)
    assert [r.ok for r in done] == [True, True, False, False, False]  # 0.02 + 0.13 fits in 0.16, 0.04 + 0.13 not
    assert len(transport.calls) == 2
    assert caught.value.result is not None and caught.value.code == "budget_exhausted"


async def test_a_retried_attempt_gives_its_reservation_back() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(500), ok(prompt_tokens=10, completion_tokens=5)], clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=0.2) as pool:
        result = await pool.submit("q", max_tokens=50)
        stats = pool.statistics()
    assert result.attempts == 2 and result.cost_usd == pytest.approx(COST)
    assert stats.cost_usd == pytest.approx(COST) and stats.reserved_usd == 0.0 and stats.stopped is None


async def test_a_zero_budget_runs_nothing() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=0.0) as pool:
        with pytest.raises(scheduler.BudgetExhausted):
            await pool.submit("q", max_tokens=5)
    assert transport.calls == []


async def test_an_unpriced_model_fails_alone_under_a_budget() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: ok(prompt_tokens=10, completion_tokens=5), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=1.0) as pool:
        unpriced = await pool.submit({"model": "mystery", "messages": [{"role": "user", "content": "x"}]},
                                     raise_errors=False)
        priced = await pool.submit("q", max_tokens=50)
    assert unpriced.error is not None and unpriced.error.code == "budget_exhausted"
    assert "mystery" in unpriced.error.message
    assert priced.ok and pool.statistics().stopped is None
    assert [body["model"] for _, body in transport.calls] == ["budget-model"]


def test_a_budget_needs_prices_for_the_configured_models() -> None:
    with pytest.raises(scheduler.ConfigurationError, match="mystery"):
        scheduler.Pool(transport=FakeTransport(), model="mystery", budget_usd=1.0)
    with pytest.raises(scheduler.ConfigurationError, match="other"):
        scheduler.Pool(transport=FakeTransport(), model="gpt-4o-mini", budget_usd=1.0, fallbacks=["other"])
    with pytest.raises(scheduler.ConfigurationError):
        scheduler.Pool(transport=FakeTransport(), model="gpt-4o-mini", budget_usd=-1.0)
