"""What the pool promises when things go wrong, proven through the real openai SDK over real HTTP.

The same promises as ``test_guarantees.py`` (which drives them in virtual time with a fake transport), here with
``openai.AsyncOpenAI(max_retries=0)`` (on its default httpx2 transport, and on ``DefaultAioHttpClient`` as the CLI
uses) against the built-in mock server on loopback, which injects each fault on demand (``server.inject``). Real
time: the mock answers at once, backoffs are milliseconds, and every test is bounded by a generous
``anyio.fail_after``, so a hang fails the test instead of stalling the suite. No wall-clock time is asserted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import openai
import pytest

import scheduler
from scheduler import errors
from scheduler.mock import MockConfig, MockServer

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"
#: a bound on a hang, far above what any test here needs: never a timing assertion
HANG_S = 30.0
#: the mock's answer to a prompt of "hello there friend", as streamed deltas
REPLY = ["Mock", " reply:", " hello", " there", " friend"]
HTTP_CLIENTS = ["httpx2", "aiohttp"]
HEADER_FAULTS = ["headers_zero", "headers_garbage", "headers_negative", "headers_none"]


@asynccontextmanager
async def mock_pool(
    config: MockConfig | None = None, *, http: str = "httpx2", **kwargs: Any
) -> AsyncIterator[tuple[MockServer, scheduler.Pool]]:
    """A mock on a free loopback port and a pool on it through the real SDK (its own retries off)."""
    kwargs.setdefault("limits", scheduler.Limits(rpm=10_000, tpm=2_000_000))
    kwargs.setdefault("backoff", scheduler.Backoff(base_s=0.01, cap_s=0.05))
    http_client = openai.DefaultAioHttpClient() if http == "aiohttp" else None
    async with (
        MockServer(config or MockConfig()) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0,
                           http_client=http_client) as client,
        scheduler.Pool(client, model=MODEL, rng=random.Random(1), **kwargs) as pool,
    ):
        yield server, pool


async def collect(stream: scheduler.PoolStream) -> list[str]:
    return [delta async for delta in stream]


# ---------------------------------------------------------------------------- 4. a 200 that is not the answer


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize("fault", ["html", "bad_shape"])
async def test_a_200_that_is_not_the_apis_answer_is_retried(fault: str, http: str) -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http) as (server, pool):
            server.inject(fault)
            result = await pool.submit("hello there friend", max_tokens=5)
    assert result.attempts == 2 and result.text == "Mock reply: hello there friend"
    assert server.stats()["faults"] == {fault: 1}


@pytest.mark.parametrize("fault", ["html", "bad_shape"])
async def test_a_200_that_is_never_the_answer_fails_with_invalid_response(fault: str) -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(max_attempts=3) as (server, pool):
            server.inject(*[fault] * 3)
            with pytest.raises(errors.InvalidResponse) as caught:
                await pool.submit("hello", max_tokens=5)
    assert caught.value.code == "invalid_response" and caught.value.result is not None
    assert caught.value.result.attempts == 3 and server.stats()["faults"] == {fault: 3}
    assert ("not JSON" if fault == "html" else "no 'choices' list") in str(caught.value)


# ------------------------------------------------------------------------------- retryable faults on the wire


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize("fault", ["drop", "server_error:503", "server_error:500"])
async def test_a_dropped_connection_or_a_5xx_is_retried(fault: str, http: str) -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http) as (server, pool):
            server.inject(fault)
            result = await pool.submit("hello there friend", max_tokens=5)
    assert result.ok and result.attempts == 2
    stats = server.stats()
    assert (stats["dropped"], stats["server_errors"]) == ((1, 0) if fault == "drop" else (0, 1))


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize("fault", ["stream_cut", "stream_truncated", "stream_error"])
async def test_a_plain_answer_cut_or_truncated_mid_body_is_retried(fault: str, http: str) -> None:
    # On a request that is not streamed, the mock's stream faults cut the JSON body: the connection closes halfway
    # (stream_cut), the body ends halfway (stream_truncated), or it is an error object with status 200.
    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http) as (server, pool):
            server.inject(fault)
            result = await pool.submit("hello there friend", max_tokens=5)
    assert result.ok and result.attempts == 2 and result.text == "Mock reply: hello there friend"


async def test_an_attempt_that_times_out_is_retried() -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(request_timeout_s=0.3) as (server, pool):
            server.inject("slow:60000")
            result = await pool.submit("hello", max_tokens=5)
    assert result.ok and result.attempts == 2


async def test_a_connection_that_always_drops_fails_when_the_attempts_run_out() -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(max_attempts=3) as (server, pool):
            server.inject("drop", "drop", "drop")
            result = await pool.submit("hello", max_tokens=5, raise_errors=False)
            after = await pool.submit("hello", max_tokens=5)
    assert result.error is not None and result.error.code == "retries_exhausted"
    assert result.attempts == 3 and server.stats()["dropped"] == 3
    assert after.ok


# ------------------------------------------------------------------------------------- 3. streams: faults


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize("fault", ["stream_cut:0", "stream_truncated:0", "stream_error:0", "stream_error_event:0",
                                   "stream_error_first", "html", "bad_shape", "drop", "server_error:502"])
async def test_a_stream_that_fails_before_its_first_delta_is_retried(fault: str, http: str) -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http) as (server, pool):
            server.inject(fault)
            stream = pool.stream("hello there friend", max_tokens=5)
            deltas = await collect(stream)
    assert deltas == REPLY
    assert stream.result is not None and stream.result.ok and stream.result.attempts == 2
    assert stream.result.text == "".join(REPLY) and stream.result.usage is not None


@pytest.mark.parametrize("http", HTTP_CLIENTS)
@pytest.mark.parametrize("fault", ["stream_cut", "stream_truncated", "stream_error", "stream_error_event"])
async def test_a_stream_that_ends_early_after_output_began_is_incomplete_not_a_success(fault: str, http: str
                                                                                       ) -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http) as (server, pool):
            server.inject(fault)
            stream = pool.stream("hello there friend", max_tokens=5)
            seen: list[str] = []
            with pytest.raises(errors.StreamIncomplete) as caught:
                async for delta in stream:
                    seen.append(delta)
            after = await pool.submit("hello", max_tokens=5)
    assert seen == REPLY[:3]  # delivered, so never repeated by a retry
    assert caught.value.code == "stream_incomplete"
    assert server.stats()["requests"] == 2 and after.ok


@pytest.mark.parametrize("fault", ["stream_error", "stream_error_event"])
async def test_an_sse_error_event_of_either_form_is_a_failed_attempt(fault: str) -> None:
    # Before any delta: retried; after: stream_incomplete. The error event is never taken for the answer's end.
    with anyio.fail_after(HANG_S):
        async with mock_pool(http="aiohttp") as (server, pool):
            server.inject(f"{fault}:0")
            retried = pool.stream("hello there friend", max_tokens=5)
            assert await collect(retried) == REPLY
            server.inject(f"{fault}:1")
            with pytest.raises(errors.StreamIncomplete) as caught:
                await collect(pool.stream("hello there friend", max_tokens=5))
    assert retried.result is not None and retried.result.attempts == 2
    assert "error event" in str(caught.value)


# ------------------------------------------------------------------------------------ 3. streams: abandoned


@pytest.mark.parametrize("http", HTTP_CLIENTS)
async def test_breaking_out_of_a_stream_cancels_the_request_and_frees_the_worker(http: str) -> None:
    # 2,000 deltas: far more than the pool's channel holds, so a worker left running would block on it.
    with anyio.fail_after(HANG_S):
        async with mock_pool(MockConfig(fill_output_cap=True), http=http, workers=1) as (server, pool):
            async for delta in pool.stream("hello there friend", max_tokens=2000):
                if delta == " hello":
                    break
            # The one worker is free again: the next job runs.
            after = await pool.submit("next", max_tokens=5)
            assert pool.statistics().in_flight == 0
    assert after.ok and after.attempts == 1
    assert server.stats()["requests"] == 2


@pytest.mark.parametrize("http", HTTP_CLIENTS)
async def test_cancelling_a_stream_consumer_cancels_the_request_in_flight(http: str) -> None:
    # The stream's answer would take a minute: only cancelling its request frees the only worker for the next job.
    async def consume(pool: scheduler.Pool) -> None:
        async for _ in pool.stream("hello there friend", max_tokens=5):
            pass

    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http, workers=1) as (server, pool):
            server.inject("slow:60000")
            task = asyncio.ensure_future(consume(pool))
            while server.stats()["requests"] == 0:  # the request is on the server, waiting out its slowness
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after = await pool.submit("next", max_tokens=5)
            assert pool.statistics().in_flight == 0
    assert after.ok and server.stats()["ok"] == 1


async def test_leaving_the_pool_on_an_error_settles_a_stream_in_flight_at_once() -> None:
    with anyio.fail_after(HANG_S):
        with pytest.raises(LookupError, match="the caller's own error"):
            async with mock_pool() as (server, pool):
                server.inject("slow:60000")
                task = asyncio.ensure_future(collect(pool.stream("hello there friend", max_tokens=5)))
                while server.stats()["requests"] == 0:
                    await asyncio.sleep(0.01)
                raise LookupError("the caller's own error")
        # The pool closed with the stream's request in flight: the stream settled instead of waiting a minute.
        with pytest.raises(scheduler.RunStopped, match="in flight"):
            await task


# ------------------------------------------------------------------------------------ deadlines and pauses


@pytest.mark.parametrize("http", HTTP_CLIENTS)
async def test_a_slow_answer_past_the_deadline_fails_the_job_with_deadline_exceeded(http: str) -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(http=http, workers=1) as (server, pool):
            server.inject("slow:60000")
            with pytest.raises(scheduler.DeadlineExceeded) as caught:
                await pool.submit("hello", max_tokens=5, timeout_s=0.5)
            after = await pool.submit("hello", max_tokens=5)  # the one worker was freed
    assert caught.value.result is not None and caught.value.result.attempts == 1
    assert caught.value.result.latency_s >= 0.5 * 0.99  # not failed before its deadline
    assert after.ok


async def test_a_stream_whose_first_byte_comes_after_the_deadline_fails_with_deadline_exceeded() -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(workers=1) as (server, pool):
            server.inject("slow:60000")
            with pytest.raises(scheduler.DeadlineExceeded):
                await collect(pool.stream("hello", max_tokens=5, timeout_s=0.5))
            after = await collect(pool.stream("hello there friend", max_tokens=5))
    assert after == REPLY


async def test_a_retry_after_longer_than_the_deadline_fails_the_job_at_once() -> None:
    # The deadline is a minute away and the server asks for two: failing at once is the only right answer, and
    # HANG_S (half the deadline) tells it from sleeping until the deadline.
    with anyio.fail_after(HANG_S):
        async with mock_pool() as (server, pool):
            server.inject("retry_after_long:120")
            with pytest.raises(scheduler.DeadlineExceeded) as caught:
                await pool.submit("hello", max_tokens=5, timeout_s=60)
    assert "past the deadline" in str(caught.value)
    assert caught.value.result is not None and caught.value.result.status == 429
    stats = server.stats()
    assert (stats["requests"], stats["rate_limited"]) == (1, 1)


async def test_the_pause_a_long_retry_after_asks_for_is_capped() -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(max_pause_s=0.2) as (server, pool):
            server.inject("retry_after_long:3600")
            result = await pool.submit("hello", max_tokens=5)
            stats = pool.statistics()
    assert result.ok and result.attempts == 2
    assert stats.rate_limited == 1 and stats.pauses == 1


# --------------------------------------------------------------------------------- 8. headers never crash


@pytest.mark.parametrize("limits", [None, scheduler.Limits(rpm=600, tpm=100_000)], ids=["learned", "given"])
@pytest.mark.parametrize("fault", HEADER_FAULTS)
async def test_rate_limit_headers_of_zero_negative_garbage_or_none_never_crash_the_dispatcher(
    fault: str, limits: scheduler.Limits | None
) -> None:
    # Every answer carries the bad headers; 600 RPM is a 10-request burst, so the limits are in play throughout.
    with anyio.fail_after(HANG_S):
        async with mock_pool(MockConfig(fault_rates={fault: 1.0}), limits=limits) as (server, pool):
            results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(8)))
            streamed = await collect(pool.stream("hello there friend", max_tokens=5))
    assert all(r.ok for r in results) and streamed == REPLY
    assert server.stats()["faults"][fault] == 9


async def test_headers_that_turn_bad_after_the_limits_were_learned_do_not_stall_the_pool() -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(limits=None) as (server, pool):
            await pool.submit("learn", max_tokens=5)
            assert pool.statistics().limits is not None
            server.inject(*HEADER_FAULTS)
            results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(8)))
    assert all(r.ok for r in results)
    assert server.stats()["faults"] == dict.fromkeys(HEADER_FAULTS, 1)


# ------------------------------------------------------------------------------------ run-fatal answers


async def test_a_quota_answer_stops_the_run_and_every_job_settles() -> None:
    with anyio.fail_after(HANG_S):
        async with mock_pool(workers=1) as (server, pool):
            server.inject("quota")
            results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5, raise_errors=False)
                                             for i in range(5)))
    codes = [r.error.code if r.error else "ok" for r in results]
    assert codes[0] == "insufficient_quota" and set(codes[1:]) <= {"insufficient_quota", "ok"}
    assert server.stats()["quota"] == 1


# ---------------------------------------------------------------------------- 7. a budget is a hard limit


@pytest.mark.parametrize("config", [MockConfig(fill_output_cap=True, uncapped_tokens=4000),
                                    MockConfig(fault_rates={"max_output": 1.0}, long_output_tokens=4000)],
                         ids=["fill_output_cap", "max_output"])
async def test_spending_never_passes_the_budget_when_every_answer_is_as_long_as_allowed(config: MockConfig) -> None:
    # Uncapped, each answer would be 4,000 tokens (2.4 dollars); the pool sends its reservation (300) as the cap.
    prices = {MODEL: {"input": 150.0, "output": 600.0}}
    budget = 2.0
    with anyio.fail_after(HANG_S):
        async with mock_pool(config, budget_usd=budget, prices=prices, default_max_tokens=300,
                             workers=8) as (server, pool):
            results = await asyncio.gather(*(pool.submit("tell me everything about " * (1 + i % 5),
                                                         raise_errors=False) for i in range(40)))
            stats = pool.statistics()
    seen = server.stats()
    # What the server billed, by its own count, at the same prices.
    billed = (seen["prompt_tokens"] * 150.0 + seen["completion_tokens"] * 600.0) / 1e6
    answered = [r for r in results if r.ok]
    assert stats.cost_usd <= budget and billed <= budget
    assert stats.cost_usd == pytest.approx(billed)
    assert answered and all(r.usage is not None and r.usage.completion_tokens == 300 for r in answered)
    assert seen["completion_tokens"] == 300 * len(answered)  # every answer was held to the cap sent
    assert {r.error.code for r in results if r.error} == {"budget_exhausted"}
