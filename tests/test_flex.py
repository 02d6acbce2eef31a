"""Flex processing in the pool, through the real openai SDK against the mock: the tier a result was served on, its
price, the long timeout, and a 429 for missing capacity told apart from a rate limit (retried, or sent at the
standard tier with ``flex_fallback="standard"``)."""

from __future__ import annotations

import openai
import pytest

import scheduler
from scheduler import Limits, Pool
from scheduler.cost import PriceTable
from scheduler.mock import MockConfig
from scheduler.retry import Backoff
from tests.mock_client import running

MODEL = "gpt-5-mini"  # offered on flex (at Batch API prices)
FAST = Backoff(base_s=0.005, cap_s=0.02)


def pool(client: openai.AsyncOpenAI, **options: object) -> Pool:
    options.setdefault("backoff", FAST)
    return Pool(client=client, model=MODEL, limits=Limits(rpm=100_000, tpm=10_000_000), workers=16,
                **options)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_results_record_the_tier_that_served_them_and_are_priced_at_it() -> None:
    prices = PriceTable()
    async with running(MockConfig()) as (_, client), pool(client) as p:
        flex = await p.submit("summarise flex", max_tokens=8, service_tier="flex")
        standard = await p.submit("summarise standard", max_tokens=8)
        explicit = await p.submit("summarise default", max_tokens=8, service_tier="default")
    assert flex.tier == "flex" and flex.body["service_tier"] == "flex"
    assert standard.tier == "standard" and explicit.tier == "standard"
    for result in (flex, standard, explicit):
        assert result.usage is not None and result.cost_usd is not None
    assert flex.usage is not None and standard.usage is not None
    assert flex.cost_usd == pytest.approx(prices.cost(MODEL, flex.usage, tier="flex"))
    standard_price = prices.cost(MODEL, flex.usage)
    assert standard_price is not None and flex.cost_usd == pytest.approx(standard_price / 2)  # batch rates
    assert standard.cost_usd == pytest.approx(prices.cost(MODEL, standard.usage))
    line = scheduler.sinks.batch_line(flex)
    assert line["scheduler"]["tier"] == "flex"


@pytest.mark.anyio
async def test_capacity_429s_are_retried_after_a_backoff_without_pausing_or_counting_as_rate_limits() -> None:
    async with running(MockConfig(flex_capacity=0.4, seed=7)) as (server, client), pool(client) as p:
        results = [r async for r in p.map([f"question {i}" for i in range(40)], max_tokens=4, service_tier="flex")]
        stats = p.statistics()
    refused = server.stats()["flex"]["unavailable"]
    assert refused > 0, "the mock refused some flex requests for capacity"
    assert all(r.ok and r.tier == "flex" for r in results)
    assert stats.capacity_refused == refused
    assert stats.rate_limited == 0 and stats.pauses == 0  # not a sign to slow down
    assert stats.flex_fallbacks == 0
    assert sum(r.attempts - 1 for r in results) == refused  # every refusal was retried, on flex


@pytest.mark.anyio
async def test_flex_fallback_sends_a_refused_flex_job_at_the_standard_tier_at_once() -> None:
    prices = PriceTable()
    async with running(MockConfig(flex_capacity=0.0)) as (server, client), pool(
        client, flex_fallback="standard"
    ) as p:
        results = [r async for r in p.map([f"q{i}" for i in range(10)], max_tokens=4, service_tier="flex")]
        stats = p.statistics()
    assert server.stats()["flex"]["unavailable"] == 10
    assert all(r.ok and r.tier == "standard" and r.attempts == 2 for r in results)
    assert all(r.body["service_tier"] == "default" for r in results)  # asked for the standard tier explicitly
    for result in results:
        assert result.usage is not None
        assert result.cost_usd == pytest.approx(prices.cost(MODEL, result.usage))
    assert (stats.flex_fallbacks, stats.capacity_refused, stats.rate_limited, stats.retries) == (10, 10, 0, 0)


@pytest.mark.anyio
async def test_without_capacity_for_long_a_flex_job_fails_with_retries_exhausted() -> None:
    async with running(MockConfig(flex_capacity=0.0)) as (_, client), pool(client, max_rate_limited_s=0.05) as p:
        result = await p.submit("never served", max_tokens=4, service_tier="flex", raise_errors=False)
    assert result.error is not None and result.error.code == "retries_exhausted"
    assert "no capacity" in result.error.message


@pytest.mark.anyio
async def test_a_flex_attempt_waits_for_the_flex_timeout_not_the_request_timeout() -> None:
    # Flex answers take 400 ms here; an ordinary attempt may take 100 ms.
    async with running(MockConfig(flex_latency_ms=400)) as (_, client):
        async with pool(client, request_timeout_s=0.1, flex_timeout_s=5.0, max_attempts=1) as p:
            slow = await p.submit("slow but cheap", max_tokens=4, service_tier="flex")
        assert slow.ok and slow.tier == "flex"
        async with pool(client, request_timeout_s=5.0, flex_timeout_s=0.1, max_attempts=1) as p:
            timed_out = await p.submit("too slow", max_tokens=4, service_tier="flex", raise_errors=False)
        assert timed_out.error is not None and timed_out.error.code == "retries_exhausted"


def test_flex_options_are_checked() -> None:
    with pytest.raises(scheduler.ConfigurationError, match="flex_fallback"):
        Pool(client=openai.AsyncOpenAI(api_key="x"), flex_fallback="batch")  # type: ignore[arg-type]
    with pytest.raises(scheduler.ConfigurationError, match="flex_timeout_s"):
        Pool(client=openai.AsyncOpenAI(api_key="x"), flex_timeout_s=0)
