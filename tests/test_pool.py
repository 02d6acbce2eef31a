"""The pool in virtual time, with an in-process transport: exact admission times, retries and stops."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler.admission import Limiter
from scheduler.testing import FakeClock, FakeTransport, error, ok, rate_limited
from scheduler.transport import Response, TransportFailure

pytestmark = pytest.mark.anyio


def make_pool(transport: FakeTransport, clock: FakeClock, **kwargs: Any) -> scheduler.Pool:
    kwargs.setdefault("limits", scheduler.Limits(rpm=6000))
    return scheduler.Pool(transport=transport, clock=clock, model="gpt-4o-mini", rng=random.Random(1), **kwargs)


async def test_paces_to_the_rpm_from_a_full_one_second_burst() -> None:
    """60 RPM, one-second burst, full at the start: one at once, then one a second."""
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=60)) as pool:
        await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(6)))
    assert transport.sent_at == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert sum(t <= 3.0 for t in transport.sent_at) == 4


async def test_paces_to_the_tpm_with_the_estimate() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(tpm=6000)) as pool:
        cost = pool.estimator.estimate("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 40,
                                                                 "messages": [{"role": "user", "content": "q"}]})
        await asyncio.gather(*(pool.submit("q", max_tokens=40) for _ in range(5)))
    # 100 tokens/s holding 100, half full at the start (cautious until calibrated): as many at once as fit
    # in 50, then one per cost/100 seconds.
    at_once = 50 // cost
    assert transport.sent_at[:at_once] == [0.0] * at_once
    gaps = [b - a for a, b in zip(transport.sent_at[at_once:], transport.sent_at[at_once + 1:], strict=False)]
    assert gaps == pytest.approx([cost / 100] * len(gaps))


async def test_a_429_pauses_all_dispatch_for_retry_after() -> None:
    clock = FakeClock()
    answers = iter([rate_limited(2), ok("a"), ok("b"), ok("c")])
    transport = FakeTransport(lambda endpoint, body: next(answers), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=60, burst_s=1)) as pool:
        first = asyncio.ensure_future(pool.submit("first", max_tokens=5))
        await asyncio.sleep(0)
        rest = await asyncio.gather(pool.submit("second", max_tokens=5), pool.submit("third", max_tokens=5))
        result = await first
    # The 429 at t=0 says "retry after 2 s": nothing leaves before t=2, and the retried job goes first.
    assert transport.sent_at == [0.0, 2.0, 3.0, 4.0]
    assert [body["messages"][0]["content"] for _, body in transport.calls] == ["first", "first", "second", "third"]
    assert result.attempts == 2 and [r.attempts for r in rest] == [1, 1]
    assert pool.statistics().rate_limited == 1


async def test_retries_5xx_with_full_jitter_backoff() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(500), error(502), TransportFailure("connection", "reset"), ok()],
                              clock=clock)
    backoff = scheduler.Backoff(base_s=1.0, cap_s=10.0)
    async with clock.autojump(), make_pool(transport, clock, backoff=backoff) as pool:
        result = await pool.submit("hello", max_tokens=5)
    expected = random.Random(1)
    delays = [expected.uniform(0, 1.0), expected.uniform(0, 2.0), expected.uniform(0, 4.0)]
    gaps = [b - a for a, b in zip(transport.sent_at, transport.sent_at[1:], strict=False)]
    assert gaps == pytest.approx(delays)
    assert result.ok and result.attempts == 4


async def test_retry_after_on_a_5xx_is_a_floor_for_the_backoff() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(503, headers={"retry-after-ms": "7000"}), ok()], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        await pool.submit("hello", max_tokens=5)
    assert transport.sent_at == [0.0, 7.0]


async def test_priority_order_under_contention() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=60)) as pool:
        blocker = asyncio.ensure_future(pool.submit("blocker", max_tokens=5))
        await asyncio.sleep(0)
        await asyncio.gather(*(pool.submit(f"p{p}-{i}", priority=p, max_tokens=5)
                               for i, p in enumerate([3, 1, 2, 0, 1])))
        await blocker
    order = [body["messages"][0]["content"] for _, body in transport.calls]
    assert order == ["blocker", "p0-3", "p1-1", "p1-4", "p2-2", "p3-0"]


async def test_insufficient_quota_stops_the_run_without_a_retry() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(429, "insufficient_quota", kind="insufficient_quota")], clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=60)) as pool:
        results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5, raise_errors=False) for i in range(3)))
        with pytest.raises(scheduler.QuotaExhausted) as caught:
            await pool.submit("later", max_tokens=5)
    assert len(transport.calls) == 1
    assert [r.error.code for r in results if r.error] == ["insufficient_quota"] * 3
    assert "quota" in str(caught.value) and caught.value.result is not None
    assert pool.statistics().stopped is not None


async def test_a_refused_key_stops_the_run_and_never_shows_the_key() -> None:
    secret = "sk-proj-SECRETkey1234567890"
    clock = FakeClock()
    transport = FakeTransport(script=[error(401, "invalid_api_key", f"Incorrect API key provided: {secret}")],
                              clock=clock)
    with capture_logs() as logs:
        async with clock.autojump(), make_pool(transport, clock) as pool:
            with pytest.raises(scheduler.AuthenticationFailed) as caught:
                await pool.submit("hello", max_tokens=5)
    assert "refused the key" in str(caught.value)
    assert secret not in str(caught.value) and secret not in repr(caught.value.result)
    assert all(secret not in str(event) for event in logs)


async def test_job_fatal_errors_are_not_retried() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: error(400, "context_length_exceeded", "too long"), clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        result = await pool.submit("x", max_tokens=5, raise_errors=False)
        with pytest.raises(scheduler.RequestRejected) as caught:
            await pool.submit("y", max_tokens=5)
    assert len(transport.calls) == 2  # one attempt each
    assert result.status == 400 and result.error is not None and "too long" in result.error.message
    assert result.error.code == "request_rejected" and caught.value.result is not None


async def test_x_should_retry_is_obeyed() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(500, headers={"x-should-retry": "false"}),
                                      error(400, headers={"x-should-retry": "true"}), ok()], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        first = await pool.submit("a", max_tokens=5, raise_errors=False)
        second = await pool.submit("b", max_tokens=5, raise_errors=False)
    assert first.error is not None and first.attempts == 1
    assert second.ok and second.attempts == 2


async def test_gives_up_after_max_attempts() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: error(503), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, max_attempts=3) as pool:
        with pytest.raises(scheduler.RetriesExhausted) as caught:
            await pool.submit("a", max_tokens=5)
    assert len(transport.calls) == 3 and caught.value.result is not None
    assert caught.value.result.attempts == 3 and caught.value.result.status == 503


async def test_deadline_fails_a_job_that_cannot_be_retried_in_time() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(503, headers={"retry-after": "30"})], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        with pytest.raises(scheduler.DeadlineExceeded):
            await pool.submit("a", max_tokens=5, timeout_s=10)
    assert len(transport.calls) == 1


async def test_a_request_larger_than_the_whole_token_limit_fails_at_once() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(tpm=1000)) as pool:
        with pytest.raises(scheduler.RequestTooLarge, match="1000 TPM"):
            await pool.submit("hello", max_tokens=5000)
    assert transport.calls == []


async def token_level(limiter: Limiter) -> float:
    (scope,) = limiter.scopes()
    return (await scope.levels())["tokens"]


async def test_refund_option_gives_unused_output_back() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: ok(prompt_tokens=10, completion_tokens=5), clock=clock)
    limits = scheduler.Limits(tpm=60_000, refund_unused=True)  # 1,000 tokens/s, holds 1,000
    limiter = Limiter(limits, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limiter=limiter) as pool:
        result = await pool.submit("hello", max_tokens=300)
        # Started half full, charged the estimate, kept only the usage.
        assert await token_level(limiter) == pytest.approx(500 - 15)
    assert result.usage == scheduler.Usage(10, 5)


async def test_without_refund_openai_keeps_the_reservation() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: ok(prompt_tokens=10, completion_tokens=5), clock=clock)
    limiter = Limiter(scheduler.Limits(tpm=60_000), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limiter=limiter) as pool:
        await pool.submit("hello", max_tokens=300)
        estimate = pool.estimator.estimate("/v1/chat/completions", transport.calls[0][1])
        assert await token_level(limiter) == pytest.approx(500 - estimate)


async def test_header_sync_slows_dispatch_when_the_server_has_less_left() -> None:
    """Another process spends the budget: the server says 0 requests left, so we wait for the refill."""
    clock = FakeClock()
    headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}
    transport = FakeTransport(lambda e, b: ok(headers=headers), clock=clock)
    limits = scheduler.Limits(rpm=60, burst_s=5, safety=0.0)
    async with clock.autojump(), make_pool(transport, clock, limits=limits) as pool:
        await pool.submit("one", max_tokens=5)
        await pool.submit("two", max_tokens=5)
    # Without the headers the five-second burst would send both at t=0.
    assert transport.sent_at == [0.0, 1.0]


async def test_learns_limits_from_the_first_response() -> None:
    clock = FakeClock()
    headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59"}
    transport = FakeTransport(lambda e, b: ok(headers=headers), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=None) as pool:
        await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(3)))
    assert pool.statistics().limits == scheduler.Limits(rpm=60)
    assert transport.sent_at[0] == 0.0 and transport.sent_at[2] - transport.sent_at[1] == pytest.approx(1.0)


async def test_map_yields_every_result_including_errors() -> None:
    clock = FakeClock()

    def answer(endpoint: str, body: Mapping[str, Any]) -> Response:
        return error(400, "bad") if body["messages"][0]["content"] == "bad" else ok(body["messages"][0]["content"])

    transport = FakeTransport(answer, clock=clock)
    requests = [scheduler.Request({"messages": [{"role": "user", "content": c}], "max_tokens": 5}, custom_id=c)
                for c in ["a", "bad", "c"]]
    async with clock.autojump(), make_pool(transport, clock, queue_size=1) as pool:
        results = {r.custom_id: r async for r in pool.map(requests)}
    assert set(results) == {"a", "bad", "c"}
    assert results["a"].text == "a" and not results["bad"].ok


async def test_map_reads_its_input_only_as_the_queue_has_room() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    pulled = 0

    def requests() -> Any:
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield scheduler.Request({"messages": [{"role": "user", "content": str(i)}], "max_tokens": 5})

    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=60), queue_size=4,
                                           workers=2) as pool:
        results = pool.map(requests())
        await results.__anext__()
        assert pulled <= 4 + 2 + 2  # queue + workers + the one being put and the one delivered
        await results.aclose()


async def test_stream_yields_deltas_then_the_result() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: ok("one two three", prompt_tokens=7, completion_tokens=3), clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        stream = pool.stream("count", max_tokens=10)
        deltas = [delta async for delta in stream]
    assert "".join(deltas) == "one two three "
    assert stream.result is not None and stream.result.usage == scheduler.Usage(7, 3)
    assert transport.calls[0][1]["stream_options"] == {"include_usage": True}


async def test_statistics_count_what_happened() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(500), ok(finish_reason="length"), ok()], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        await pool.submit("a", max_tokens=5)
        await pool.submit("b", max_tokens=5)
        stats = pool.statistics()
    assert (stats.submitted, stats.succeeded, stats.failed, stats.retries, stats.attempts) == (2, 2, 0, 1, 3)
    assert stats.truncated == 1 and stats.prompt_tokens == 20


async def test_cancelling_a_submit_sends_nothing_for_it() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=60)) as pool:
        await pool.submit("first", max_tokens=5)
        waiting = asyncio.ensure_future(pool.submit("cancelled", max_tokens=5))
        await asyncio.sleep(0)
        waiting.cancel()
        await pool.submit("after", max_tokens=5)
    assert [b["messages"][0]["content"] for _, b in transport.calls] == ["first", "after"]


async def test_submit_outside_the_pool_is_refused() -> None:
    pool = scheduler.Pool(transport=FakeTransport(), model="m")
    with pytest.raises(scheduler.PoolClosed):
        await pool.submit("x")


async def test_every_way_in_is_refused_once_the_pool_has_closed() -> None:
    """A job made for a closed pool would never settle: stream, map, embed and a submit waiting for room are
    refused instead."""
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, queue_size=1) as pool:
        await pool.submit("before", max_tokens=5)
    with anyio.fail_after(10):  # a guard: without the refusal, the stream waits forever
        with pytest.raises(scheduler.PoolClosed):
            async for _ in pool.stream("x", max_tokens=5):
                pass
        with pytest.raises(scheduler.PoolClosed):
            async for _ in pool.map(["x"], max_tokens=5):
                pass
        with pytest.raises(scheduler.PoolClosed):
            await pool.embed(["x"])


async def test_bodies_and_endpoints() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        await pool.submit([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        await pool.submit({"model": "text-embedding-3-small", "input": "x"})
        await pool.submit({"input": "x", "max_output_tokens": 5})
        with pytest.raises(scheduler.ConfigurationError):
            await pool.submit({"foo": 1})
    assert [e for e, _ in transport.calls] == ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
    assert transport.calls[0][1] == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                     "temperature": 0, "model": "gpt-4o-mini"}


async def test_map_yields_every_result_when_deliveries_wait_for_the_consumer() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    requests = [scheduler.Request({"messages": [{"role": "user", "content": str(i)}], "max_tokens": 5},
                                  custom_id=str(i)) for i in range(200)]
    limits = scheduler.Limits(rpm=10**9)
    async with clock.autojump(), make_pool(transport, clock, workers=16, limits=limits) as pool:
        # A buffer of 1: finished jobs queue up to deliver, and the stream must not close under them.
        seen = [r.custom_id async for r in pool.map(requests, buffer=1)]
    assert sorted(seen, key=int) == [str(i) for i in range(200)]


async def test_map_stops_feeding_while_the_reader_is_behind() -> None:
    """Results the reader has not taken count against the input read ahead: they never pile up."""
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    pulled = 0

    def requests() -> Any:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield scheduler.Request({"messages": [{"role": "user", "content": str(i)}], "max_tokens": 5})

    async with clock.autojump(), make_pool(transport, clock, queue_size=4, workers=2,
                                           limits=scheduler.Limits(rpm=60_000)) as pool:
        results = pool.map(requests(), buffer=2)
        await results.__anext__()
        await clock.sleep(60)  # the reader is busy elsewhere for a simulated minute
        # Fed and unread: queue + workers + buffer; plus the one taken and the one in the feeder's hand.
        # Of 1,000.
        assert pulled <= (4 + 2 + 2) + 1 + 1
        assert len(transport.calls) <= pulled
        await results.aclose()
        pool.stop()


async def test_map_takes_body_keywords_as_submit_does() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        results = [r async for r in pool.map(["a", "b", {"messages": [{"role": "user", "content": "c"}]}],
                                             max_tokens=20, temperature=0)]
    assert all(r.ok for r in results)
    assert [(body["max_tokens"], body["temperature"]) for _, body in transport.calls] == [(20, 0)] * 3


async def test_each_model_has_buckets_of_its_own() -> None:
    """OpenAI limits each model separately: a run that mixes models must not push them through one bucket pair,
    nor hold every model to the smallest one's limit."""
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    limits = scheduler.Limits(rpm=60)  # one a second, for every model not named
    async with clock.autojump(), make_pool(transport, clock, limits=limits,
                                           model_limits={"gpt-4o": scheduler.Limits(rpm=120)}) as pool:
        await asyncio.gather(*(pool.submit({"model": m, "messages": [{"role": "user", "content": m}],
                                            "max_tokens": 5}) for m in ["gpt-4o-mini"] * 3 + ["gpt-4o"] * 3))
        scopes = {s.model: s.limits for s in pool.statistics().scopes}
    sent = {m: [t for t, (_, body) in zip(transport.sent_at, transport.calls, strict=True) if body["model"] == m]
            for m in ("gpt-4o-mini", "gpt-4o")}
    assert sent["gpt-4o-mini"] == [0.0, 1.0, 2.0]
    assert sent["gpt-4o"] == [0.0, 0.5, 1.0]  # it starts with half its burst of two, then two a second
    assert scopes == {"gpt-4o-mini": limits, "gpt-4o": scheduler.Limits(rpm=120)}
