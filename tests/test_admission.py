"""Admission semantics, one suite for every store: each test runs on the in-process store and on Redis.

The Redis store runs here on virtual time (the scripts take the time from the test's clock instead of Redis'
``TIME``), so both stores see the same instants and the numbers asserted are exact for both. The one setting
that differs on purpose, the share of the burst a shared store keeps free, is set to 0 here and tested apart.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio
from redis_server import RedisServer, needs_redis

from scheduler.admission import Limiter, MemoryStore, ScopeLimiter
from scheduler.admission.redis_store import RedisStore
from scheduler.dialects import LimitReport, Window
from scheduler.limits import Limits
from scheduler.testing import FakeClock

pytestmark = pytest.mark.anyio

Make = Callable[..., Limiter]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def make(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Make]:
    """``make(limits)``: a Limiter on the store under test; every call is another process (owner) sharing the
    store's state, and every test has scopes of its own."""
    endpoint = f"https://api.test/{uuid.uuid4().hex}|key"
    clients: list[redis.asyncio.Redis] = []

    def build(limits: Limits | None, **options: object) -> Limiter:
        if request.param == "memory":
            store = shared.setdefault("memory", MemoryStore(clock))
        else:
            server: RedisServer = request.getfixturevalue("server")
            client = redis.asyncio.Redis.from_url(server.url)
            clients.append(client)
            store = RedisStore(client, keep=0.0, clock=clock, virtual_time=True)
        limiter = Limiter(limits, store=store, clock=clock, **options)  # type: ignore[arg-type]
        limiter.endpoint = endpoint  # type: ignore[attr-defined]
        return limiter

    shared: dict[str, MemoryStore] = {}
    yield build
    for client in clients:
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def scope(limiter: Limiter, model: str = "gpt-4o-mini") -> ScopeLimiter:
    return limiter.scope(limiter.endpoint, model)  # type: ignore[attr-defined]


def costs(tokens: float = 0.0, requests: float = 1.0) -> dict[str, float]:
    return {"requests": requests, "tokens": tokens, "raw": tokens}


def report(requests: tuple[float, float] | None = None, tokens: tuple[float, float] | None = None) -> LimitReport:
    def window(pair: tuple[float, float] | None) -> Window | None:
        return None if pair is None else Window(limit=pair[0], remaining=pair[1])

    return LimitReport("openai", window(requests), window(tokens))


async def test_a_fresh_scope_admits_its_burst_then_paces_at_the_rate(make: Make, clock: FakeClock) -> None:
    s = scope(make(Limits(rpm=60)))  # one a second, holds one
    assert await s.acquire(costs(), 0) == 0.0
    assert await s.acquire(costs(), 0) == pytest.approx(1.0)
    clock.advance(0.25)
    assert await s.acquire(costs(), 0) == pytest.approx(0.75)
    clock.advance(100.0)  # a long idle period banks no more than the burst
    assert await s.acquire(costs(), 0) == 0.0
    assert await s.acquire(costs(), 0) == pytest.approx(1.0)


async def test_every_bucket_or_none_and_tokens_start_half_full(make: Make, clock: FakeClock) -> None:
    s = scope(make(Limits(rpm=60, tpm=1200)))  # tokens: 20 a second, holds 20, starts with 10
    assert await s.acquire(costs(8), 0) == 0.0
    # The request bucket is empty: nothing is charged, tokens included.
    assert await s.acquire(costs(1), 0) == pytest.approx(1.0)
    levels = await s.levels()
    assert levels["tokens"] == pytest.approx(2) and levels["requests"] == pytest.approx(0)


async def test_a_cost_larger_than_the_bucket_waits_for_a_full_one_then_leaves_debt(
    make: Make, clock: FakeClock
) -> None:
    s = scope(make(Limits(tpm=600)))  # 10 a second, holds 10, starts with 5
    assert await s.acquire(costs(25, 0), 0) == pytest.approx(0.5)  # needs the full 10, not 25
    clock.advance(0.5)
    assert await s.acquire(costs(25, 0), 0) == 0.0
    assert (await s.levels())["tokens"] == pytest.approx(-15)
    assert await s.acquire(costs(1, 0), 0) == pytest.approx(1.6)


async def test_header_sync_lowers_the_buckets_to_what_the_server_has_left(make: Make, clock: FakeClock) -> None:
    s = scope(make(Limits(rpm=6000, tpm=600_000)))  # 100 requests and 10,000 tokens a second
    assert await s.acquire(costs(100), 0) == 0.0
    sent_at = clock.now()
    mark = s.on_wire(costs(100))
    mark = mark if isinstance(mark, dict) else await mark  # recorded before the next one leaves
    assert await s.acquire(costs(100), 0) == 0.0  # admitted after the first, before its answer
    s.on_wire(costs(100))
    clock.advance(0.1)
    await s.observe(report(requests=(6000, 20), tokens=(600_000, 1000)), sent_at, mark)
    levels = await s.levels()
    # remaining + refill over 0.1 s - sent since the request left - 5% of the burst in reserve
    assert levels["requests"] == pytest.approx(20 + 10 - 1 - 5)
    assert levels["tokens"] == pytest.approx(1000 + 1000 - 100 - 500)


async def test_header_sync_never_raises_a_bucket(make: Make, clock: FakeClock) -> None:
    s = scope(make(Limits(rpm=6000)))
    mark = s.on_wire(costs())
    for _ in range(50):
        assert await s.acquire(costs(), 0) == 0.0
    before = (await s.levels())["requests"]
    # The server reports its per-minute bucket nearly full: that is no reason to send more.
    await s.observe(report(requests=(6000, 5990)), clock.now(), mark)
    assert (await s.levels())["requests"] == pytest.approx(before)


async def test_a_lower_limit_in_the_headers_applies_to_every_process(make: Make, clock: FakeClock) -> None:
    one, other = scope(make(Limits(rpm=6000))), scope(make(Limits(rpm=6000)))
    await one.observe(report(requests=(60, 60)), clock.now(), one.on_wire(costs()))
    # One a second with a burst of one, for the other process too.
    assert await other.acquire(costs(), 0) == 0.0
    assert await other.acquire(costs(), 0) == pytest.approx(1.0)


async def test_a_429_gives_the_charge_back_empties_the_bucket_and_halves_the_burst(
    make: Make, clock: FakeClock
) -> None:
    s = scope(make(Limits(rpm=600, tpm=60_000)))  # 10 requests and 1,000 tokens a second
    assert await s.acquire(costs(300), 0) == 0.0
    s.on_wire(costs(300))
    await s.refused(costs(300), "tokens")
    levels = await s.levels()
    assert levels["tokens"] == pytest.approx(0)
    # The request's charge came back (the server charged nothing), within the burst halved to 5.
    assert levels["requests"] == pytest.approx(5)
    clock.advance(10.0)
    assert (await s.levels())["tokens"] == pytest.approx(500)


async def test_a_429_takes_the_refused_request_out_of_what_was_sent(make: Make, clock: FakeClock) -> None:
    s = scope(make(Limits(rpm=6000, tpm=600_000)))
    for tokens in (300, 200):
        assert await s.acquire(costs(tokens), 0) == 0.0
        s.on_wire(costs(tokens))
    await s.refused(costs(200), None)
    mark = s.on_wire(costs(10))
    marks = mark if isinstance(mark, dict) else await mark
    assert marks["requests"] == 2 and marks["tokens"] == 310


async def test_marks_count_what_went_on_the_wire_not_what_was_admitted(make: Make, clock: FakeClock) -> None:
    """A burst is admitted at once but leaves one by one: the first answer reflects only what had arrived."""
    s = scope(make(Limits(rpm=6000, tpm=600_000, safety=0.0)))
    for _ in range(10):
        assert await s.acquire(costs(100), 0) == 0.0
    mark = s.on_wire(costs(100))
    # Another process spent most of the server's bucket: 4,100 left when our first request arrived.
    await s.observe(report(tokens=(600_000, 4100)), clock.now(), mark)
    # The nine admitted after it had not left yet, so they are not taken off the server's figure twice: the
    # bucket (5,000 - 1,000) stays at 4,000, not 4,100 - 900.
    assert (await s.levels())["tokens"] == pytest.approx(4000)


async def test_a_server_that_counts_real_usage_gets_the_unused_charge_back(make: Make, clock: FakeClock) -> None:
    from scheduler.results import Usage

    s = scope(make(Limits(tpm=60_000, refund_unused=True)))  # starts with 500
    charge = s.costs(300, 250)
    assert await s.acquire(charge, 0) == 0.0
    await s.settle(charge, Usage(prompt_tokens=10, completion_tokens=5))
    assert (await s.levels())["tokens"] == pytest.approx(500 - 15)


async def test_a_reserve_keeps_a_share_of_each_bucket_for_urgent_work(make: Make, clock: FakeClock) -> None:
    # 10 a second, holds 10 (starts with 5): 2 of them for priority <= 0
    s = scope(make(Limits(rpm=600, reserve={0: 0.2})))
    admitted = 0
    while await s.acquire(costs(), 5) == 0.0:
        admitted += 1
    assert admitted == 3
    assert await s.acquire(costs(), 0) == 0.0 and await s.acquire(costs(), 0) == 0.0
    assert await s.acquire(costs(), 0) > 0.0


async def test_a_claim_keeps_room_for_a_big_request_from_another_process(make: Make, clock: FakeClock) -> None:
    big, small = scope(make(Limits(tpm=12_000, burst_s=0.5))), scope(make(Limits(tpm=12_000, burst_s=0.5)))
    # 200 tokens a second, holds 100 (starts with 50): the big request needs the whole bucket.
    assert await big.acquire(costs(100, 0), 0) > 0.0
    clock.advance(1.0)  # refused for a second: the next refusal claims the room
    assert await small.acquire(costs(100, 0), 0) == 0.0  # the small one empties it meanwhile
    assert await big.acquire(costs(100, 0), 0) > 0.0  # refused again, and now it holds a claim
    clock.advance(0.3)
    assert await small.acquire(costs(10, 0), 0) > 0.0  # 60 in the bucket, but the claim wants 100: wait
    clock.advance(0.2)
    assert await big.acquire(costs(100, 0), 0) == 0.0  # its turn
    assert await small.acquire(costs(10, 0), 0) > 0.0 and (await small.levels())["tokens"] == pytest.approx(0)
