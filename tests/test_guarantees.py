"""What the pool promises when things go wrong, each promise driven by the fault that would break it.

Every submitted job settles (a result or a typed error, within its deadline); exceptions come out as
themselves; abandoned streams free their worker; a 200 that is not the API's answer is not a success; a budget
is a hard limit; limits keep learning and debts are not kept; caches and error bodies keep secrets. Virtual
time throughout (``FakeClock``): a "minute" passes at once, and the times asserted are exact.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler.admission import Limiter, MemoryStore
from scheduler.cache import MemoryCache
from scheduler.sinks import MemorySink
from scheduler.testing import FakeClock, FakeTransport, error, html, ok, rate_limited, streamed, wrong_shape
from scheduler.transport import Response, TransportFailure

pytestmark = pytest.mark.anyio

SECRET = "sk-proj-SECRETkey1234567890abcdef"


def make_pool(transport: FakeTransport, clock: FakeClock, **kwargs: Any) -> scheduler.Pool:
    kwargs.setdefault("limits", scheduler.Limits(rpm=6000))
    return scheduler.Pool(transport=transport, clock=clock, model="gpt-4o-mini", rng=random.Random(1), **kwargs)


def prompt_of(body: Mapping[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


# ---------------------------------------------------------------------------------------- 1. every job settles


async def test_an_unexpected_exception_in_the_transport_becomes_an_internal_error_and_the_pool_goes_on() -> None:
    clock = FakeClock()

    def answer(endpoint: str, body: Mapping[str, Any]) -> Response:
        if prompt_of(body) == "bug":
            raise KeyError("a bug in a transport")
        return ok(prompt_of(body))

    with capture_logs() as logs:
        async with clock.autojump(), make_pool(FakeTransport(answer, clock=clock), clock) as pool:
            with pytest.raises(scheduler.JobError) as caught:
                await pool.submit("bug", max_tokens=5)
            after = await pool.submit("fine", max_tokens=5)
    assert caught.value.code == "internal_error" and caught.value.result is not None
    assert caught.value.result.error is not None and "KeyError" in caught.value.result.error.message
    assert after.text == "fine"
    internal = [event for event in logs if event["event"] == "job_internal_error"]
    assert len(internal) == 1 and "KeyError" in str(internal[0].get("exc_info") or internal[0])


async def test_a_sink_that_raises_does_not_hang_the_caller() -> None:
    class BrokenSink(MemorySink):
        async def write(self, result: scheduler.Result) -> None:
            raise OSError(28, "No space left on device")

    clock = FakeClock()
    async with clock.autojump(), make_pool(FakeTransport(clock=clock), clock, sink=BrokenSink()) as pool:
        result = await pool.submit("hello", max_tokens=5, raise_errors=False)
        second = await pool.submit("again", max_tokens=5, raise_errors=False)
    # The answer is kept (the body is there) but the caller learns it did not reach the sink.
    assert result.error is not None and result.error.code == "internal_error"
    assert "sink" in result.error.message and result.body["choices"][0]["message"]["content"] == "ok"
    assert second.error is not None and second.error.code == "internal_error"


async def test_an_answer_with_garbage_usage_still_settles() -> None:
    clock = FakeClock()
    body = {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": "many", "completion_tokens": None, "prompt_tokens_details": [1]}}
    transport = FakeTransport(lambda e, b: Response(200, {}, body, "req"), clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        result = await pool.submit("hello", max_tokens=5)
    assert result.ok and result.text == "hi"


async def test_a_transport_that_never_answers_fails_the_job_at_its_deadline() -> None:
    clock = FakeClock()

    async def never(endpoint: str, body: Mapping[str, Any]) -> Response:
        await asyncio.Event().wait()  # ignores the timeout it was given
        raise AssertionError

    async with clock.autojump(), make_pool(FakeTransport(never, clock=clock), clock) as pool:
        with pytest.raises(scheduler.DeadlineExceeded):
            await pool.submit("hello", max_tokens=5, timeout_s=5)
        assert clock.now() == pytest.approx(5.0, abs=0.5)


async def test_a_queued_job_fails_at_its_deadline_while_another_waits_for_the_limit() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=1)) as pool:
        await pool.submit("first", max_tokens=5)  # the next admission is a minute away
        blocked = asyncio.ensure_future(pool.submit("second", max_tokens=5))
        await asyncio.sleep(0)
        with pytest.raises(scheduler.DeadlineExceeded):
            await pool.submit("third", max_tokens=5, timeout_s=5, priority=1)
        assert clock.now() == pytest.approx(5.0, abs=0.1)
        await blocked


async def test_leaving_the_pool_on_an_exception_settles_every_pending_job_first() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    pending: list[asyncio.Future[scheduler.Result]] = []
    with pytest.raises(ValueError, match="the caller's own error") as caught:
        async with clock.autojump(), make_pool(transport, clock, limits=scheduler.Limits(rpm=1)) as pool:
            pending = [asyncio.ensure_future(pool.submit(f"q{i}", max_tokens=5, raise_errors=False))
                       for i in range(3)]
            await asyncio.sleep(0)
            raise ValueError("the caller's own error")
    assert type(caught.value) is ValueError  # itself, not an ExceptionGroup
    done, _ = await asyncio.wait(pending, timeout=5)  # a bound on a hang, not a timing assertion
    assert len(done) == 3
    codes = [future.result().error.code if future.result().error else "ok" for future in pending]
    # At 1 RPM at most one was sent; the others never ran and say so.
    assert codes.count("run_stopped") >= 2 and set(codes) <= {"ok", "run_stopped"}


async def test_a_scheduler_error_raised_inside_the_pool_comes_out_as_itself() -> None:
    clock = FakeClock()
    async with clock.autojump():
        with pytest.raises(scheduler.SchedulerError):
            async with make_pool(FakeTransport(clock=clock), clock) as pool:
                await pool.submit({"not": "a request"})


async def test_a_shared_limit_lost_mid_run_fails_the_jobs_instead_of_hanging_them() -> None:
    class LostStore(MemoryStore):
        async def acquire(self, *args: Any) -> tuple[float, str | None]:
            raise scheduler.LimiterUnavailable("the shared limit's Redis is gone")

    clock = FakeClock()
    limiter = Limiter(scheduler.Limits(rpm=60), store=LostStore(clock), clock=clock)
    async with clock.autojump(), make_pool(FakeTransport(clock=clock), clock, limiter=limiter) as pool:
        results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5, raise_errors=False) for i in range(3)))
    assert [r.error.code if r.error else None for r in results] == ["limiter_unavailable"] * 3
    assert results[0].error is not None and "Redis" in results[0].error.message


# -------------------------------------------------------------------------------------- 3. streams abandoned


async def test_breaking_out_of_a_stream_cancels_the_request_and_frees_the_worker() -> None:
    clock = FakeClock()
    cancelled = asyncio.Event()

    async def endless(endpoint: str, body: Mapping[str, Any]) -> Any:
        if not body.get("stream"):
            return ok("after")

        async def deltas() -> Any:
            try:
                i = 0
                while True:
                    yield f"w{i} "
                    i += 1
                    await clock.sleep(0.1)
            finally:
                cancelled.set()

        return streamed(deltas())

    async with clock.autojump(), make_pool(FakeTransport(endless, clock=clock), clock, workers=1) as pool:
        async for delta in pool.stream("go on forever", max_tokens=5):
            if delta == "w2 ":
                break
        await asyncio.wait_for(cancelled.wait(), 10)
        # The one worker is free again: the next job runs at once.
        assert (await pool.submit("next", max_tokens=5)).text == "after"
    assert pool.statistics().in_flight == 0


async def test_cancelling_a_stream_consumer_cancels_the_request() -> None:
    clock = FakeClock()
    cancelled = asyncio.Event()

    async def endless(endpoint: str, body: Mapping[str, Any]) -> Any:
        async def deltas() -> Any:
            try:
                while True:
                    yield "w "
                    await clock.sleep(0.1)
            finally:
                cancelled.set()

        return streamed(deltas())

    async def consume(pool: scheduler.Pool) -> None:
        async for _ in pool.stream("forever", max_tokens=5):
            pass

    async with clock.autojump(), make_pool(FakeTransport(endless, clock=clock), clock, workers=1) as pool:
        task = asyncio.ensure_future(consume(pool))
        await clock.sleep(1.0)
        task.cancel()
        await asyncio.wait_for(cancelled.wait(), 10)
    assert pool.statistics().in_flight == 0


async def test_a_stream_cut_before_the_first_delta_is_retried() -> None:
    clock = FakeClock()
    script = [streamed(["never"], fault="cut", after=0), streamed(["fine"])]
    transport = FakeTransport(script=script, clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        stream = pool.stream("q", max_tokens=5)
        text = "".join([delta async for delta in stream])
    assert text == "fine" and stream.result is not None and stream.result.attempts == 2


@pytest.mark.parametrize("fault", ["cut", "truncated", "error"])
async def test_a_stream_that_ends_early_after_output_began_is_incomplete_not_a_success(fault: str) -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[streamed(["one ", "two ", "three "], fault=fault, after=2)], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        stream = pool.stream("q", max_tokens=5)
        seen: list[str] = []
        with pytest.raises(scheduler.JobError) as caught:
            async for delta in stream:
                seen.append(delta)
    assert seen == ["one ", "two "]
    assert caught.value.code == "stream_incomplete"
    assert len(transport.calls) == 1


@pytest.mark.parametrize("fault", ["truncated", "error"])
async def test_a_stream_that_ends_early_before_output_is_retried(fault: str) -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[streamed(["x"], fault=fault, after=0), streamed(["whole"])], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        text = "".join([delta async for delta in pool.stream("q", max_tokens=5)])
    assert text == "whole"


# ------------------------------------------------------------------------------ 4. a 200 that is not the answer


@pytest.mark.parametrize("bad", [html(), wrong_shape()])
async def test_a_200_that_is_not_the_apis_answer_is_retried(bad: Response) -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[bad, ok("real")], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        result = await pool.submit("q", max_tokens=5)
    assert result.text == "real" and result.attempts == 2


async def test_a_200_that_is_never_the_answer_fails_with_its_own_code() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: html(), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, max_attempts=3) as pool:
        result = await pool.submit("q", max_tokens=5, raise_errors=False)
    assert result.error is not None and result.error.code == "invalid_response"
    assert "html" in result.error.message.lower() and len(transport.calls) == 3


async def test_the_answer_of_each_endpoint_is_checked_for_its_own_shape() -> None:
    clock = FakeClock()
    embedding = Response(200, {}, {"object": "list", "data": [{"embedding": [0.1], "index": 0}]}, "r")
    transport = FakeTransport(script=[ok("chat, not embeddings"), embedding], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        result = await pool.submit({"model": "text-embedding-3-small", "input": "x"})
    assert result.attempts == 2 and result.body["data"][0]["embedding"] == [0.1]


# ------------------------------------------------------------------------------------ 7. a budget is a hard limit


async def test_under_a_budget_an_uncapped_request_is_sent_with_the_cap_it_is_charged_for() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=10.0, default_max_tokens=300) as pool:
        await pool.submit("no cap given")
        await pool.submit({"model": "gpt-4o-mini", "input": "responses too"})
        await pool.submit({"model": "text-embedding-3-small", "input": "embeddings have no output"})
    chat, responses, embeddings = (body for _, body in transport.calls)
    assert chat["max_completion_tokens"] == 300 and "max_tokens" not in chat
    assert responses["max_output_tokens"] == 300
    assert "max_completion_tokens" not in embeddings and "max_output_tokens" not in embeddings


async def test_spending_never_passes_the_budget_when_every_answer_is_as_long_as_allowed() -> None:
    clock = FakeClock()
    prices = {"gpt-4o-mini": {"input": 150.0, "output": 60.0}}  # about 8 cents a request, capped at 1,024 out

    def longest(endpoint: str, body: Mapping[str, Any]) -> Response:
        # The server bills the most it may: the whole output cap, and more prompt tokens than tiktoken counts.
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or 100_000
        prompt = sum(len(m["content"]) for m in body["messages"]) // 3 + 12
        return ok(prompt_tokens=prompt, completion_tokens=cap, finish_reason="length")

    transport = FakeTransport(longest, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=2.0, prices=prices, workers=16) as pool:
        results = await asyncio.gather(*(pool.submit("tell me everything about " * (1 + i % 7), raise_errors=False)
                                         for i in range(300)))
        stats = pool.statistics()
    assert stats.cost_usd <= 2.0
    assert any(r.ok for r in results) and any(r.error and r.error.code == "budget_exhausted" for r in results)


async def test_an_attempt_without_an_answer_counts_its_worst_case_against_the_budget() -> None:
    clock = FakeClock()
    prices = {"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}  # $0.001 a token
    transport = FakeTransport(script=[TransportFailure("connection", "reset")] * 10, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, budget_usd=1.0, prices=prices, max_attempts=10) as pool:
        result = await pool.submit("q", max_tokens=100, raise_errors=False)
    # The server may have billed each attempt it never answered: about $0.1 each, so ten cannot all go.
    assert result.error is not None and result.error.code == "budget_exhausted"
    assert len(transport.calls) < 10


# ---------------------------------------------------------------------- 8. limits keep learning; debts not kept


async def test_an_answer_without_headers_does_not_freeze_the_pool_unlimited() -> None:
    clock = FakeClock()
    answers = iter([ok()] + [ok(headers={"x-ratelimit-limit-requests": "60",
                                         "x-ratelimit-remaining-requests": "59"})] * 10)

    async def answer(endpoint: str, body: Mapping[str, Any]) -> Response:
        await clock.sleep(0.5)
        return next(answers)

    transport = FakeTransport(answer, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=None) as pool:
        await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(5)))
        assert pool.statistics().limits == scheduler.Limits(rpm=60)
    # One probe at a time until an answer tells the limits (the second), then 60 RPM from a one-request burst.
    assert transport.sent_at == pytest.approx([0.0, 0.5, 1.0, 2.0, 3.0], abs=0.06)


async def test_a_429_gives_back_the_whole_charge_of_the_refused_request() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[rate_limited(0.0, kind="tokens"), ok(), ok()], clock=clock)
    limits = scheduler.Limits(tpm=60_000, safety=0.0)  # 1,000 tokens a second, a 1 s burst
    async with clock.autojump(), make_pool(transport, clock, limits=limits) as pool:
        big = await pool.submit("big", max_tokens=2000)  # more than the bucket: admitted from full, in debt
        await pool.submit("small", max_tokens=10)
    # The refused attempt's 2,000 tokens are not owed: the retry waits for a full bucket (not 2 s of debt too),
    # and the small request after it only for its own tokens.
    assert big.attempts == 2
    first_retry, small = transport.sent_at[1], transport.sent_at[2]
    assert first_retry <= 1.01 and small - first_retry <= 2.01


async def test_a_request_queued_before_the_limits_were_learned_still_fails_as_too_large() -> None:
    clock = FakeClock()
    headers = {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "990"}

    async def answer(endpoint: str, body: Mapping[str, Any]) -> Response:
        await clock.sleep(1.0)  # "huge" is queued before this answer tells the limits
        return ok(headers=headers)

    transport = FakeTransport(answer, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, limits=None) as pool:
        probe = asyncio.ensure_future(pool.submit("small", max_tokens=5))
        await asyncio.sleep(0)
        with pytest.raises(scheduler.RequestTooLarge):
            await pool.submit("huge", max_tokens=5000)
        await probe
    assert len(transport.calls) == 1


@pytest.mark.parametrize("value", ["0", "-5", "garbage", "NaN", "1e400", ""])
async def test_a_rate_limit_header_of_zero_negative_or_garbage_never_crashes_the_dispatcher(value: str) -> None:
    clock = FakeClock()
    headers = {f"x-ratelimit-{k}-{d}": value for k in ("limit", "remaining") for d in ("requests", "tokens")}
    transport = FakeTransport(lambda e, b: ok(headers=headers), clock=clock)
    # 60 RPM holds one request: every later one waits on a bucket the headers must not have broken.
    for limits in (None, scheduler.Limits(rpm=60, tpm=100_000)):
        async with clock.autojump(), make_pool(transport, clock, limits=limits) as pool:
            results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(5)))
        assert all(r.ok for r in results)


# --------------------------------------------------------------------------------- 10. caches and secrets


async def test_a_fallbacks_answer_is_cached_under_the_fallbacks_own_request() -> None:
    clock = FakeClock()

    def answer(endpoint: str, body: Mapping[str, Any]) -> Response:
        return error(404, "model_not_found") if body["model"] == "gpt-4o-mini" else ok(f"from {body['model']}")

    cache = MemoryCache()
    transport = FakeTransport(answer, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, cache=cache, fallbacks=["gpt-4.1-mini"]) as pool:
        first = await pool.submit("q", max_tokens=5, temperature=0)
        again = await pool.submit("q", max_tokens=5, temperature=0)
        direct = await pool.submit({"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "q"}],
                                    "max_tokens": 5, "temperature": 0})
    assert first.text == "from gpt-4.1-mini" and first.model == "gpt-4.1-mini"
    # The primary's request was never answered by the primary: asking again asks the primary again.
    assert not again.cached
    assert direct.cached and direct.text == "from gpt-4.1-mini"


async def test_every_string_of_an_error_body_is_redacted() -> None:
    clock = FakeClock()
    body = {"error": {"message": f"bad key {SECRET}", "param": f"Authorization: Bearer {SECRET}", "type": "x",
                      "code": None, "details": [{"hint": f"key={SECRET}"}]}}
    transport = FakeTransport(lambda e, b: Response(400, {}, body, "r"), clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        result = await pool.submit("q", max_tokens=5, raise_errors=False)
    assert SECRET not in repr(result) and SECRET[:12] not in repr(result.body)


async def test_a_shared_cache_never_serves_one_keys_answer_to_another() -> None:
    from openai import AsyncOpenAI

    clock = FakeClock()
    cache = MemoryCache()
    texts = []
    for key in ("sk-org-a-0123456789", "sk-org-b-0123456789"):
        client = AsyncOpenAI(api_key=key, base_url="http://127.0.0.1:9/v1")
        transport = FakeTransport(lambda e, b, key=key: ok(f"answer for {key[:8]}"), clock=clock)
        async with clock.autojump(), scheduler.Pool(client, transport=transport, clock=clock, model="gpt-4o-mini",
                                                    limits=scheduler.Limits(rpm=600), cache=cache) as pool:
            texts.append((await pool.submit("q", max_tokens=5, temperature=0)).text)
        await client.close()
    assert texts == ["answer for sk-org-a", "answer for sk-org-b"]


# ------------------------------------------------------------------------------ deadlines, pauses and patience


async def test_a_retry_after_longer_than_the_deadline_fails_the_job_at_once() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[rate_limited(120.0)], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        with pytest.raises(scheduler.DeadlineExceeded):
            await pool.submit("q", max_tokens=5, timeout_s=30)
        assert clock.now() < 1.0


async def test_the_global_pause_has_a_ceiling_with_a_warning() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[rate_limited(3600.0), ok()], clock=clock)
    with capture_logs() as logs:
        async with clock.autojump(), make_pool(transport, clock, max_pause_s=60) as pool:
            result = await pool.submit("q", max_tokens=5)
    assert result.ok and transport.sent_at[1] == pytest.approx(60.0, abs=0.5)
    assert any(event["event"] == "pause_capped" and event["log_level"] == "warning" for event in logs)


async def test_429s_do_not_use_up_a_jobs_attempts() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[rate_limited(5.0)] * 10 + [ok()], clock=clock)
    async with clock.autojump(), make_pool(transport, clock, max_attempts=3) as pool:
        result = await pool.submit("q", max_tokens=5)
    assert result.ok and result.attempts == 11


async def test_429s_are_bounded_by_time_not_by_count() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: rate_limited(10.0), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, max_rate_limited_s=120) as pool:
        result = await pool.submit("q", max_tokens=5, raise_errors=False)
    assert result.error is not None and result.error.code == "retries_exhausted"
    assert "429" in result.error.message and 100 <= clock.now() <= 140
