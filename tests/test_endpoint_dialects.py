"""Each provider's dialect, through the real openai SDK against the mock server speaking it.

An endpoint's dialect is recognised from its headers (or forced with ``Endpoint(dialect=...)``); each test runs
the pool against a mock that counts, answers and refuses as that provider does (``MockConfig(dialect=...)``) and
checks what a user of that provider relies on. Learning from the headers runs in real time against quick
limits; pacing runs on one virtual clock shared by the pool and the mock (``FakeClock``, the mock on
``clock.wall``). No wall-clock time is asserted.
"""

from __future__ import annotations

import asyncio

import anyio
import openai
import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler.mock import MockConfig, MockServer
from scheduler.testing import FakeClock

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"
HANG_S = 60.0
FAST = scheduler.Backoff(base_s=0.01, cap_s=0.05)


def client(server: MockServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test-0123456789", max_retries=0, timeout=30)


def requests(count: int, max_tokens: int = 5) -> list[scheduler.Request]:
    return [scheduler.Request({"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}],
                               "max_tokens": max_tokens}) for i in range(count)]


# ---------------------------------------------------------------------------- OpenAI


async def test_openai_limits_are_learned_from_the_headers_and_the_dialect_recognised() -> None:
    async with MockServer(MockConfig(rpm=30_000, tpm=5_000_000)) as server, client(server) as c:
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=[scheduler.Endpoint(client=c)], backoff=FAST) as pool:
                results = [r async for r in pool.map(requests(100))]
                stats = pool.statistics()
    assert all(r.ok for r in results)
    assert stats.endpoints[0].dialect == "openai"
    assert stats.scopes[0].limits == scheduler.Limits(rpm=30_000, tpm=5_000_000)


# ---------------------------------------------------------------------------- Azure OpenAI


async def test_azure_a_120_rpm_deployment_is_not_lowered_to_the_20_its_headers_count() -> None:
    # Azure's x-ratelimit-limit-requests counts a 10 s window: a 120 RPM deployment says 20.
    async with MockServer(MockConfig(dialect="azure", rpm=120, tpm=1_000_000)) as server, client(server) as c:
        with capture_logs() as logs, anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=[scheduler.Endpoint(client=c)], backoff=FAST) as learned:
                results = [r async for r in learned.map(requests(6))]
                learned_stats = learned.statistics()
            limits = scheduler.Limits(rpm=120, tpm=1_000_000)
            async with scheduler.Pool(endpoints=[scheduler.Endpoint(client=c, limits=limits)],
                                      backoff=FAST) as told:
                results += [r async for r in told.map(requests(6))]
                told_stats = told.statistics()
        headers = (await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)).headers
    assert headers["x-ratelimit-limit-requests"] == "20"
    assert all(r.ok for r in results)
    assert learned_stats.endpoints[0].dialect == "azure"
    assert learned_stats.scopes[0].limits is not None and learned_stats.scopes[0].limits.rpm == 120
    assert told_stats.scopes[0].limits == limits
    assert not [log for log in logs if log["event"] == "rate_limit_lowered"]


async def test_azure_short_windows_do_not_throttle_a_run_below_its_limit() -> None:
    clock = FakeClock()
    config = MockConfig(dialect="azure", rpm=1200, tpm=10_000_000)  # 200 requests per 10 s window
    async with MockServer(config, clock=clock.wall) as server, client(server) as c:
        limits = scheduler.Limits(rpm=1200, tpm=10_000_000)
        with anyio.fail_after(HANG_S):
            async with clock.autojump(), scheduler.Pool(endpoints=[scheduler.Endpoint(client=c, limits=limits)],
                                                        clock=clock, backoff=FAST) as pool:
                started = clock.now()
                results = [r async for r in pool.map(requests(600))]
                elapsed = clock.now() - started
        refused = server.stats()["rate_limited"]
    assert all(r.ok for r in results)
    # 600 requests at 1,200 RPM take 30 s at best: the run reaches >= 0.95 of that, with hardly any 429s.
    assert 30.0 / elapsed >= 0.95 and refused <= 0.005 * 600


# ---------------------------------------------------------------------------- Anthropic


async def test_anthropic_input_and_output_token_limits_are_learned_from_its_headers() -> None:
    config = MockConfig(dialect="anthropic", rpm=6000, tpm=600_000, otpm=60_000)  # tpm: input tokens per minute
    async with MockServer(config) as server, client(server) as c:
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=[scheduler.Endpoint(client=c)], backoff=FAST) as pool:
                results = [r async for r in pool.map(requests(100, max_tokens=50))]
                stats = pool.statistics()
    assert all(r.ok for r in results) and stats.rate_limited == 0
    assert stats.endpoints[0].dialect == "anthropic"
    # The combined anthropic-ratelimit-tokens-* is the sum of the two: admission uses each on its own.
    assert stats.scopes[0].limits == scheduler.Limits(rpm=6000, itpm=600_000, otpm=60_000)


async def test_anthropic_a_429_on_output_tokens_empties_only_the_output_bucket() -> None:
    clock = FakeClock()  # moved by hand: the buckets are read right after the 429, before any refill
    config = MockConfig(dialect="anthropic", rpm=6000, tpm=600_000, otpm=600)  # 10 output tokens a second
    async with MockServer(config, clock=clock.wall) as server, client(server) as c:
        # Told more output than the server allows: the second request's 8 output tokens do not fit there.
        limits = scheduler.Limits(rpm=6000, itpm=600_000, otpm=60_000)
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=[scheduler.Endpoint(client=c, limits=limits)], clock=clock,
                                      backoff=FAST) as pool:
                jobs = [asyncio.ensure_future(pool.submit(f"hello {i}", model=MODEL, max_tokens=8))
                        for i in range(2)]
                while pool.statistics().rate_limited == 0:
                    await anyio.sleep(0.005)
                (scope,) = pool._limiter.scopes()
                levels = await scope.levels()
                async with clock.autojump():
                    results = await asyncio.gather(*jobs)
    assert server.stats()["rate_limited"] == 1 and all(r.ok for r in results)
    assert levels["output_tokens"] <= 0  # emptied: the server said this bucket is spent
    # The others keep what they held (a 429 halves every burst for a while: 100 requests a burst become 50,
    # and the 5,000 input tokens the new bucket started with still fit), less the two requests.
    assert levels["input_tokens"] > 4900 and levels["requests"] >= 48


# ---------------------------------------------------------------------------- LiteLLM


async def test_litellm_a_spent_calendar_minute_waits_for_the_next_minute_without_using_attempts() -> None:
    # The proxy counts per calendar minute and admits 9 of every 10 (as observed); its 429 carries no wait.
    clock = FakeClock(wall_start=1_800_000_000.0 - 5.0)  # 5 s before a minute turns
    config = MockConfig(dialect="litellm", rpm=10, tpm=None, rate_limit_headers=False)
    async with MockServer(config, clock=clock.wall) as server, client(server) as c:
        limits = scheduler.Limits(rpm=600, tpm=1_000_000)  # the pool was told far more than the proxy allows
        with anyio.fail_after(HANG_S):
            async with clock.autojump(), scheduler.Pool(endpoints=[scheduler.Endpoint(client=c, limits=limits)],
                                                        clock=clock, max_attempts=1, backoff=FAST) as pool:
                results = [r async for r in pool.map(requests(12))]
                elapsed = clock.now()
                dialect = pool.statistics().endpoints[0].dialect
    assert dialect == "litellm"
    # Every request succeeded with a single attempt allowed: a spent window is waited out, not a failure.
    assert all(r.ok for r in results) and server.stats()["rate_limited"] >= 1
    late = sorted(r.latency_s for r in results)[9:]
    # The three that did not fit waited for the minute's turn (5 s away), not 60 s.
    assert all(5.0 <= latency <= 6.5 for latency in late) and elapsed <= 7.0


# ---------------------------------------------------------------------------- no limits stated


async def test_none_a_server_of_our_own_is_paced_by_adaptive_concurrency_without_a_503_storm() -> None:
    # vLLM or Ollama: no rate-limit headers; 4 requests at a time, 4 more may wait, the rest get 503.
    config = MockConfig(dialect="none", capacity=4, max_queue=4, latency_ms=20.0)
    async with MockServer(config) as server, client(server) as c:
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=[scheduler.Endpoint(client=c)], workers=64,
                                      backoff=scheduler.Backoff(base_s=0.05, cap_s=1.0)) as pool:
                results = [r async for r in pool.map(requests(200))]
                stats = pool.statistics().endpoints[0]
        capacity = server.stats()["capacity"]
    assert all(r.ok for r in results)
    assert stats.dialect == "none" and stats.circuit == "closed"
    # 64 workers would have kept 56 requests past the queue: adapting, hardly any were turned away ...
    assert capacity["overloaded"] <= 0.05 * 200
    # ... and the pool kept the server busy: at least its capacity in flight, its queue never overflowing.
    assert stats.concurrency is not None and stats.concurrency >= 4 and capacity["max_queued"] <= 4
