"""Several keys, deployments and servers as one pool, through the real openai SDK against the mock server.

Each test names what it proves. Where the limits are configured, the pool and the mock run on one virtual clock
(``FakeClock``; the mock reads ``clock.wall``), so "a minute of traffic" takes a fraction of a second and its
timing is exact; where the pool learns its limits from the headers, it runs in real time against high limits
(learning waits on answers, and virtual time would race ahead of the network meanwhile). No wall-clock time is
asserted; ``anyio.fail_after`` only bounds a hang.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import openai
import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler import errors
from scheduler.endpoints import CircuitBreaker
from scheduler.mock import KeyLimits, MockConfig, MockServer
from scheduler.testing import FakeClock, FakeTransport, error, ok, rate_limited

pytestmark = pytest.mark.anyio

MODEL = "gpt-4o-mini"
HANG_S = 60.0
FAST = scheduler.Backoff(base_s=0.01, cap_s=0.05)
PLENTY = scheduler.Limits(rpm=60_000, tpm=50_000_000)


def client(server: MockServer, key: str = "sk-test-0123456789") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30)


@asynccontextmanager
async def servers(*configs: MockConfig, clock: FakeClock | None = None) -> AsyncIterator[list[MockServer]]:
    """Mock servers on free loopback ports (on ``clock``'s wall time when given)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(MockServer(c, clock=clock.wall if clock else None)) for c in configs]


async def run_all(pool: scheduler.Pool, count: int, model: str = MODEL) -> list[scheduler.Result]:
    prompts = [scheduler.Request({"model": model, "messages": [{"role": "user", "content": f"hello {i}"}],
                                  "max_tokens": 5}) for i in range(count)]
    return [result async for result in pool.map(prompts)]


def served(results: Sequence[scheduler.Result]) -> Counter[str | None]:
    return Counter(result.served_by for result in results)


def endpoint(pool: scheduler.Pool, name: str) -> Any:
    return next(e for e in pool.statistics().endpoints if e.name == name)


# ---------------------------------------------------------------------------- sharing the work


async def test_two_keys_deliver_the_sum_of_their_limits_each_at_its_own_pace() -> None:
    clock = FakeClock()
    config = MockConfig(keys={"key-a": KeyLimits(3000, 10_000_000), "key-b": KeyLimits(6000, 10_000_000)})
    async with servers(config, clock=clock) as (server,), client(server, "key-a") as a, client(server, "key-b") as b:
        endpoints = [scheduler.Endpoint(client=a, limits=scheduler.Limits(rpm=3000, tpm=10_000_000), name="a"),
                     scheduler.Endpoint(client=b, limits=scheduler.Limits(rpm=6000, tpm=10_000_000), name="b")]
        with anyio.fail_after(HANG_S):
            async with clock.autojump(), scheduler.Pool(endpoints=endpoints, clock=clock) as pool:
                started = clock.now()
                results = await run_all(pool, 1800)
                elapsed = clock.now() - started
        keys = server.stats()["keys"]
    assert all(result.ok for result in results)
    # Each key got work in proportion to its limit, each paced by buckets of its own, synced from its own
    # headers: the server refused hardly any (the design's figure: 429s under 0.5% of requests).
    assert served(results) == {"a": 600, "b": 1200}
    assert keys["key-a"]["rate_limited"] + keys["key-b"]["rate_limited"] <= 0.005 * 1800
    # Together they deliver the sum of their limits: 1,800 requests at 9,000 RPM take 12 s, less the first
    # second's burst the server's buckets start with.
    assert 11.0 <= elapsed <= 12.0 / 0.95


async def test_weights_share_the_work_when_every_endpoint_can_take_it() -> None:
    clock = FakeClock()
    unlimited = MockConfig(rpm=None, tpm=None)
    async with servers(unlimited, unlimited, clock=clock) as (s1, s2), client(s1) as c1, client(s2) as c2:
        endpoints = [scheduler.Endpoint(client=c1, limits=PLENTY, weight=3.0, name="heavy"),
                     scheduler.Endpoint(client=c2, limits=PLENTY, weight=1.0, name="light")]
        with anyio.fail_after(HANG_S):
            async with clock.autojump(), scheduler.Pool(endpoints=endpoints, clock=clock) as pool:
                results = await run_all(pool, 400)
    assert all(result.ok for result in results)
    counts = served(results)
    assert abs(counts["heavy"] - 300) <= 2 and counts["heavy"] + counts["light"] == 400


async def test_models_restrict_what_each_endpoint_serves() -> None:
    async with servers(MockConfig(), MockConfig()) as (s1, s2), client(s1) as c1, client(s2) as c2:
        endpoints = [scheduler.Endpoint(client=c1, limits=PLENTY, models=["gpt-4o"], name="big"),
                     scheduler.Endpoint(client=c2, limits=PLENTY, models=["gpt-4o-mini", "mock-model"], name="small")]
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=endpoints, backoff=FAST, model="gpt-4o-mini") as pool:
                big = await run_all(pool, 30, "gpt-4o")
                small = await run_all(pool, 30, "gpt-4o-mini")
                with pytest.raises(errors.RequestRejected, match=r"no endpoint serves the model 'gpt-4\.1'"):
                    await pool.submit("hi", model="gpt-4.1", max_tokens=5)
                scopes = {(scope.endpoint, scope.model) for scope in pool.statistics().scopes}
    assert served(big) == {"big": 30} and served(small) == {"small": 30}
    assert scopes == {("big", "gpt-4o"), ("small", "gpt-4o-mini")}
    assert s1.stats()["models"].keys() == {"gpt-4o"} and s2.stats()["models"].keys() == {"gpt-4o-mini"}


async def test_each_endpoint_learns_its_own_limits_from_its_own_headers() -> None:
    config = MockConfig(keys={"key-a": KeyLimits(30_000, 5_000_000), "key-b": KeyLimits(60_000, 9_000_000)})
    async with servers(config) as (server,), client(server, "key-a") as a, client(server, "key-b") as b:
        endpoints = [scheduler.Endpoint(client=a, name="a"), scheduler.Endpoint(client=b, name="b")]
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=endpoints, backoff=FAST) as pool:
                results = await run_all(pool, 200)
                scopes = {scope.endpoint: scope.limits for scope in pool.statistics().scopes}
    assert all(result.ok for result in results) and set(served(results)) == {"a", "b"}
    assert scopes == {"a": scheduler.Limits(rpm=30_000, tpm=5_000_000),
                      "b": scheduler.Limits(rpm=60_000, tpm=9_000_000)}


# ---------------------------------------------------------------------------- failover


async def test_a_quota_running_out_mid_run_costs_no_request_and_retires_the_endpoint_with_a_warning() -> None:
    async with servers(MockConfig(), MockConfig(quota_after=40)) as (s1, s2), client(s1) as c1, client(s2) as c2:
        endpoints = [scheduler.Endpoint(client=c1, limits=PLENTY, name="steady"),
                     scheduler.Endpoint(client=c2, limits=PLENTY, name="spent")]
        with capture_logs() as logs, anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=endpoints, backoff=FAST, max_attempts=1) as pool:
                results = await run_all(pool, 400)
                spent = endpoint(pool, "spent")
                stopped = pool.statistics().stopped
    assert [r.error for r in results if not r.ok] == []
    assert served(results) == {"steady": 360, "spent": 40}
    assert spent.retired is not None and "quota" in spent.retired and stopped is None
    retired = [log for log in logs if log["event"] == "endpoint_retired"]
    assert [(log["endpoint"], log["log_level"], log["code"]) for log in retired] == [
        ("spent", "warning", "insufficient_quota")]


async def test_the_last_endpoint_retiring_stops_the_run() -> None:
    configs = (MockConfig(quota_after=10), MockConfig(quota_after=15))
    async with servers(*configs) as (s1, s2), client(s1) as c1, client(s2) as c2:
        endpoints = [scheduler.Endpoint(client=c1, limits=PLENTY, name="one"),
                     scheduler.Endpoint(client=c2, limits=PLENTY, name="two")]
        with anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=endpoints, backoff=FAST) as pool:
                results = await run_all(pool, 100)
                stats = pool.statistics()
                with pytest.raises(errors.QuotaExhausted):
                    await pool.submit("hi", model=MODEL, max_tokens=5)
    ok = [result for result in results if result.ok]
    assert len(ok) == 25 and served(ok) == {"one": 10, "two": 15}
    assert {result.error.code for result in results if result.error is not None} == {"insufficient_quota"}
    assert stats.stopped is not None and "quota" in stats.stopped
    assert all(e.retired is not None for e in stats.endpoints)


async def test_a_refused_key_retires_its_endpoint_and_the_others_do_the_work() -> None:
    config = MockConfig(keys={"good-key": KeyLimits(60_000, 50_000_000)})
    async with servers(config) as (server,), client(server, "good-key") as good, client(server, "bad-key") as bad:
        endpoints = [scheduler.Endpoint(client=bad, limits=PLENTY, name="bad"),
                     scheduler.Endpoint(client=good, limits=PLENTY, name="good")]
        with capture_logs() as logs, anyio.fail_after(HANG_S):
            async with scheduler.Pool(endpoints=endpoints, backoff=FAST, max_attempts=1) as pool:
                results = await run_all(pool, 100)
                bad_state = endpoint(pool, "bad")
    assert all(result.ok for result in results) and served(results) == {"good": 100}
    assert bad_state.retired is not None and "refused the key" in bad_state.retired
    assert server.stats()["unauthorized"] >= 1
    assert "bad-key" not in str(logs) and "good-key" not in str(logs)


async def test_an_endpoint_answering_500s_opens_its_breaker_is_routed_around_and_a_probe_closes_it() -> None:
    clock = FakeClock()
    async with servers(MockConfig(rpm=None, tpm=None), MockConfig(rpm=None, tpm=None), clock=clock) as (s1, s2):
        s2.inject(*["server_error:500"] * 20)
        async with client(s1) as c1, client(s2) as c2:
            limits = scheduler.Limits(rpm=1200, tpm=10_000_000)
            endpoints = [scheduler.Endpoint(client=c1, limits=limits, name="healthy"),
                         scheduler.Endpoint(client=c2, limits=limits, name="failing")]
            with capture_logs() as logs, anyio.fail_after(HANG_S):
                async with clock.autojump(), scheduler.Pool(endpoints=endpoints, clock=clock, backoff=FAST,
                                                            max_attempts=2, rng=random.Random(3)) as pool:
                    results = await run_all(pool, 1200)  # a minute of traffic on the healthy endpoint alone
                    failing = endpoint(pool, "failing")
    # Not one request failed: each that met a 500 was retried on the other endpoint (max_attempts=2).
    assert [result.error for result in results if not result.ok] == []
    assert all(result.served_by == "healthy" for result in results if result.attempts > 1)
    events = [(log["event"], log.get("endpoint")) for log in logs if log["event"].startswith("circuit_")]
    assert events[0] == ("circuit_opened", "failing") and events[-1] == ("circuit_closed", "failing")
    # Open, it was sent nothing but probes: its 20 failures, then the probe that found it well.
    assert failing.failures == 20 and failing.circuit == "closed"
    assert s2.stats()["faults"] == {"server_error": 20} and served(results)["failing"] > 100


# ---------------------------------------------------------------------------- the breaker


def test_only_the_probe_closes_an_open_circuit() -> None:
    breaker = CircuitBreaker(window=2, cool_down_s=5.0)
    breaker.failure(0.0, "e")
    breaker.failure(0.0, "e")
    assert breaker.state == "open" and not breaker.allows(4.9)
    breaker.success("e")  # a request sent before the circuit opened says nothing about the endpoint now
    assert breaker.state == "open" and breaker.allows(5.0)
    breaker.sent(5.0)  # the probe
    assert breaker.state == "half-open" and not breaker.allows(5.0)  # one probe at a time
    breaker.failure(6.0, "e")  # the probe failed: twice the cool-down
    assert breaker.state == "open" and not breaker.allows(15.9) and breaker.allows(16.0)
    breaker.sent(16.0)
    breaker.success("e")
    assert breaker.state == "closed" and breaker.allows(16.0)


def test_a_run_of_failures_among_answers_does_not_open_the_circuit_half_of_the_window_does() -> None:
    breaker = CircuitBreaker(window=20, cool_down_s=5.0)
    for _ in range(15):
        breaker.success("e")
    for _ in range(9):  # fast 5xx come back in runs at volume: 9 of the last 20 is under half
        breaker.failure(0.0, "e")
    assert breaker.state == "closed"
    breaker.failure(0.0, "e")  # 10 of the last 20
    assert breaker.state == "open"
    breaker.sent(5.0)
    breaker.success("e")  # the probe: the window starts afresh, failures before it are not held against it
    assert breaker.state == "closed"
    for _ in range(18):
        breaker.failure(6.0, "e")
    assert breaker.state == "closed"  # 19 answers with the probe's: not yet 20 to judge by
    breaker.failure(6.0, "e")
    assert breaker.state == "open"


def test_a_probe_that_ends_without_an_answer_lets_the_next_request_probe() -> None:
    breaker = CircuitBreaker(window=1, cool_down_s=5.0)
    breaker.failure(0.0, "e")
    breaker.sent(5.0)
    assert not breaker.allows(6.0)
    breaker.lost()  # the probe was cancelled (its deadline, its caller gone)
    assert breaker.allows(6.0)


async def test_a_probe_answered_429_closes_the_circuit_instead_of_leaving_it_half_open() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[error(500)] * 20 + [rate_limited(0.5), ok()], clock=clock)
    with anyio.fail_after(HANG_S):
        async with clock.autojump(), scheduler.Pool(transport=transport, model=MODEL, clock=clock, backoff=FAST,
                                                     limits=PLENTY, max_attempts=25) as pool:
            result = await pool.submit("hi", max_tokens=5)
            circuit = pool.statistics().endpoints[0].circuit
    # Twenty 500s (a window of them) opened the circuit; after the cool-down the probe met a 429 (the endpoint
    # is up, only busy), which closed it, and the retry succeeded.
    assert result.ok and result.attempts == 22 and circuit == "closed"
    assert transport.sent_at[20] >= transport.sent_at[19] + 5.0
