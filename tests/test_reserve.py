"""Capacity held for urgent work: ``Limits(reserve={0: 0.2})`` keeps a fifth of each bucket for priority 0.

Two pools stand for two processes sharing one budget: a bulk run at priority 5 that saturates the limit, and a
service submitting a priority-0 request now and then. Through one ``MemoryStore``, in virtual time: with the
reservation the service's requests go at once; without it they wait for the bulk run (until their claim on the
bucket, a second later). Through a real Redis (``tests/redis_server.py``), two connections as two processes
have with ``--redis``: with time standing still, the bulk run leaves the reserved share of the shared bucket to
the urgent request. (The waits of real processes through Redis are measured in ``benchmarks/bench_endpoints.py``.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from redis_server import RedisServer, needs_redis

import scheduler
from scheduler.admission import BucketStore, Limiter, MemoryStore
from scheduler.dialects import LimitReport, Window
from scheduler.testing import FakeClock, FakeTransport

pytestmark = pytest.mark.anyio

HANG_S = 60.0
RPM = 600  # ten a second, a burst of ten
BULK = 400  # forty seconds of the whole limit
URGENT = 12
LIMITS = scheduler.Limits(rpm=RPM, reserve={0: 0.2})
NO_RESERVE = scheduler.Limits(rpm=RPM)

def pool(clock: FakeClock, store: BucketStore, limits: scheduler.Limits) -> scheduler.Pool:
    # One endpoint name: the pools spend the same scope (one key's limit).
    endpoint = scheduler.Endpoint(transport=FakeTransport(clock=clock), name="api")
    return scheduler.Pool(endpoints=[endpoint], model="m", clock=clock, prices={"m": {"input": 0, "output": 0}},
                          limiter=Limiter(limits, store=store, clock=clock))


def bulk_jobs(count: int) -> list[scheduler.Request]:
    return [scheduler.Request({"model": "m", "messages": [{"role": "user", "content": "bulk"}], "max_tokens": 5},
                              priority=5) for _ in range(count)]


async def urgent_waits(bulk_limits: scheduler.Limits) -> tuple[list[float], float]:
    """The waits of the urgent requests while a bulk run saturates the limit; and when the bulk run ended."""
    clock = FakeClock()
    store = MemoryStore(clock)
    async with clock.autojump(), pool(clock, store, bulk_limits) as bulk, pool(clock, store, NO_RESERVE) as service:

        async def run_bulk() -> list[scheduler.Result]:
            return [result async for result in bulk.map(bulk_jobs(BULK))]

        task = asyncio.ensure_future(run_bulk())
        await clock.sleep(5.0)  # the bulk run has spent every burst by now
        waits = []
        for _ in range(URGENT):
            result = await service.submit("urgent", max_tokens=5, priority=0)
            waits.append(result.latency_s)
            await clock.sleep(1.5)
        results = await task
        assert all(result.ok for result in results)
        return waits, clock.now()


async def test_a_reservation_keeps_urgent_requests_waiting_no_longer_than_a_moment() -> None:
    with anyio.fail_after(HANG_S):
        waits, ended = await urgent_waits(LIMITS)
    # Every urgent request went at once (its share of the bucket was kept for it) ...
    assert max(waits) <= 0.1
    # ... while the bulk run saturated the limit: its 400 requests and the 12 urgent ones, at 600 RPM, end
    # within a second of the 41 s they need at the limit (less the first burst: the buckets start full).
    assert ended <= (BULK + URGENT) / (RPM / 60)


async def test_without_a_reservation_urgent_requests_wait_for_the_bulk_run() -> None:
    with anyio.fail_after(HANG_S):
        waits, _ = await urgent_waits(NO_RESERVE)
    # The bulk run takes every request as the bucket refills: an urgent one waits until its claim (after a
    # second of refusals) makes the bulk run leave it room.
    assert min(waits) >= 1.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.mark.parametrize("reserve", [pytest.param(True, marks=needs_redis, id="reserved"),
                                     pytest.param(False, marks=needs_redis, id="not-reserved")])
async def test_under_redis_the_reservation_holds_across_processes_sharing_the_budget(
    redis_url: str, reserve: bool
) -> None:
    from scheduler.admission.redis_store import RedisStore

    # Time stands still (no autojump): what each process may take is what the shared bucket holds now.
    clock = FakeClock()
    bulk_store = await RedisStore.connect(redis_url, clock=clock, virtual_time=True)
    service_store = await RedisStore.connect(redis_url, clock=clock, virtual_time=True)  # another process
    await bulk_store._redis.flushdb()
    with anyio.fail_after(HANG_S):
        async with (pool(clock, bulk_store, LIMITS if reserve else NO_RESERVE) as bulk,
                    pool(clock, service_store, NO_RESERVE) as service):
            feeding = asyncio.ensure_future(_drain(bulk.map(bulk_jobs(20))))
            # The bulk run takes what it may of the full bucket, then waits for time to pass.
            taken = -1
            while (attempts := bulk.statistics().attempts) != taken or attempts == 0:
                taken = attempts
                await anyio.sleep(0.05)
            urgent = asyncio.ensure_future(service.submit("urgent", max_tokens=5, priority=0))
            await asyncio.wait([urgent], timeout=0.5)
            went = urgent.done()
            async with clock.autojump():
                await urgent
                await feeding
    # A shared bucket of 7.5 requests (a quarter kept for the processes' jitter), starting with 3.75: the bulk
    # run, kept from the fifth of the bucket held for priority 0 (1.5), stops at 2 and the urgent request goes at
    # once; without the reservation the bulk run took a third and the urgent request had to wait for a refill.
    assert (taken, went) == ((2, True) if reserve else (3, False))


def test_learned_limits_keep_the_reservation() -> None:
    limiter = Limiter(None, reserve={0: 0.2})
    scope = limiter.scope("endpoint", "m")
    scope.model.learn(LimitReport("openai", requests=Window(600, 600)))
    assert scope.snapshot() == scheduler.Limits(rpm=600, reserve={0: 0.2})
    assert scope.model.floor(5) == pytest.approx(0.2) and scope.model.floor(0) == 0.0
    with pytest.raises(scheduler.ConfigurationError, match="reserve"):
        Limiter(None, reserve={0: 1.5})


async def _drain(results: AsyncIterator[scheduler.Result]) -> None:
    async for result in results:
        assert result.ok
