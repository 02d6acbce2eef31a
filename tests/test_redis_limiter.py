"""The Redis-backed shared limit, against a real redis-server on a loopback port.

The buckets run on Redis' clock, so these tests use real time: rates are chosen so that the few milliseconds a
test takes barely refill anything, and the assertions allow for them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio
from redis_server import RedisServer, free_port, needs_redis

from scheduler import ConfigurationError, Limits
from scheduler.redis_limiter import RedisLimiter, SharedLimitUnavailable, limit_keys

pytestmark = needs_redis


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def scope() -> str:
    # Every test its own limit: the server is shared by the module.
    return f"http://api.test/v1|{uuid.uuid4().hex[:16]}|gpt-4o-mini"


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(server.url)
    yield connection
    await connection.aclose()


async def _limiter(server: RedisServer, limits: Limits, scope: str, **options: float) -> RedisLimiter:
    # No jitter reserve unless asked: the buckets then hold exactly what LocalLimiter's hold.
    options.setdefault("jitter_reserve", 0.0)
    return await RedisLimiter.connect(server.url, limits, scope=scope, **options)


@pytest.mark.anyio
async def test_fresh_limit_admits_one_request_then_says_how_long_to_wait(server: RedisServer, scope: str) -> None:
    async with await _limiter(server, Limits(rpm=60), scope) as limiter:  # one a second, burst of one
        assert await limiter.acquire(100) == 0.0
        wait = await limiter.acquire(100)
        assert wait == pytest.approx(1.0, abs=0.05)
        levels = await limiter.levels()
        assert levels.charged_requests == 1
        assert levels.charged_tokens == 100


@pytest.mark.anyio
async def test_both_buckets_or_neither_and_oversized_cost_leaves_debt(server: RedisServer, scope: str) -> None:
    # 20 tokens a second, a burst of 20, the first burst half full (10).
    async with await _limiter(server, Limits(rpm=60, tpm=1200), scope) as limiter:
        assert await limiter.acquire(8) == 0.0
        # The request bucket is empty: nothing is charged, tokens included.
        assert await limiter.acquire(1) == pytest.approx(1.0, abs=0.05)
        levels = await limiter.levels()
        assert levels.tokens == pytest.approx(2, abs=0.5)
        assert levels.charged_requests == 1 and levels.charged_tokens == 8
    async with await _limiter(server, Limits(tpm=600), scope + "b") as limiter:  # 10 a second, holds 10, 5 now
        # 25 tokens need a full bucket (10), not 25: half a second away.
        assert await limiter.acquire(25) == pytest.approx(0.5, abs=0.05)
        await asyncio.sleep(0.5)
        assert await limiter.acquire(25) == 0.0
        levels = await limiter.levels()
        assert levels.tokens == pytest.approx(-15, abs=0.5)
        assert await limiter.acquire(1) == pytest.approx(1.6, abs=0.06)


@pytest.mark.anyio
async def test_the_jitter_reserve_keeps_a_share_of_the_burst_free(server: RedisServer, scope: str) -> None:
    async with await _limiter(server, Limits(rpm=600), scope, jitter_reserve=0.25) as limiter:  # holds 7.5 of 10
        # A fresh limit starts half full: 3.75.
        assert [await limiter.acquire(1) for _ in range(3)] == [0.0] * 3
        assert await limiter.acquire(1) == pytest.approx(0.025, abs=0.01)
        await asyncio.sleep(1.0)
        assert [await limiter.acquire(1) for _ in range(7)] == [0.0] * 7
        assert await limiter.acquire(1) == pytest.approx(0.05, abs=0.01)


@pytest.mark.anyio
async def test_processes_with_one_scope_share_one_budget(server: RedisServer, scope: str) -> None:
    limits = Limits(rpm=240)  # four a second, a burst of four, two in a fresh bucket
    async with await _limiter(server, limits, scope) as one, await _limiter(server, limits, scope) as two:
        assert await one.acquire(10) == 0.0
        assert await two.acquire(10) == 0.0
        assert await one.acquire(10) == pytest.approx(0.25, abs=0.03)
        assert await two.acquire(10) == pytest.approx(0.25, abs=0.03)
        async with await _limiter(server, limits, scope + "-other") as other:
            assert await other.acquire(10) == 0.0  # another scope is another budget


@pytest.mark.anyio
async def test_refund_gives_tokens_back(server: RedisServer, scope: str) -> None:
    async with await _limiter(server, Limits(tpm=6000), scope) as limiter:  # 100 a second, holds 100, 50 now
        assert await limiter.acquire(50) == 0.0
        assert await limiter.acquire(30) == pytest.approx(0.3, abs=0.03)
        await limiter.refund(40)
        assert await limiter.acquire(30) == 0.0
        levels = await limiter.levels()
        assert levels.charged_tokens == 40  # 50 - 40 + 30
        assert levels.tokens == pytest.approx(10, abs=1.5)


@pytest.mark.anyio
async def test_header_sync_lowers_the_shared_bucket_and_never_raises_it(server: RedisServer, scope: str) -> None:
    limits = Limits(rpm=6000, tpm=60_000)  # 1,000 tokens a second, holds 1,000, 500 now
    async with await _limiter(server, limits, scope) as limiter, await _limiter(server, limits, scope) as other:
        assert await limiter.acquire(100) == 0.0
        sent_at = limiter._clock.now()
        mark = limiter.on_wire(100)
        # Another process charges 50 after our request went out: the server had not counted those yet.
        assert await other.acquire(50) == 0.0
        headers = {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "300",
                   "x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "40"}
        await limiter.observe(headers, sent_at, mark)
        levels = await limiter.levels()
        # 300 + refill since - 50 charged since - 5% of the burst (50) = about 200; was 350.
        assert levels.tokens == pytest.approx(200, abs=15)
        assert levels.requests == pytest.approx(40 - 1 - 5, abs=1)  # was 48; the other's request, 5% of 100
        assert levels.sent_requests == 1 and levels.sent_tokens == 100
        # A response saying more is left does not raise the level.
        sent_at = limiter._clock.now()
        mark = limiter.on_wire(0)
        await limiter.observe({"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "59000"},
                              sent_at, mark)
        assert (await limiter.levels()).tokens == pytest.approx(200, abs=30)


@pytest.mark.anyio
async def test_a_lower_limit_in_the_headers_applies_to_every_process(server: RedisServer, scope: str) -> None:
    limits = Limits(rpm=600)
    async with await _limiter(server, limits, scope) as limiter, await _limiter(server, limits, scope) as other:
        sent_at = limiter._clock.now()
        mark = limiter.on_wire(0)
        await limiter.observe({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "60"},
                              sent_at, mark)
        # Now one a second with a burst of one, for the other process too.
        assert await other.acquire(1) == 0.0
        assert await other.acquire(1) == pytest.approx(1.0, abs=0.05)


@pytest.mark.anyio
async def test_a_429_empties_the_named_bucket_and_halves_the_burst(server: RedisServer, scope: str) -> None:
    async with await _limiter(server, Limits(rpm=600, tpm=60_000), scope) as limiter:
        assert await limiter.acquire(100) == 0.0
        mark = limiter.on_wire(100)
        await limiter.observe(None, limiter._clock.now(), mark)  # as the pool does: a 429's headers are not synced
        await limiter.rate_limited("tokens", 100)
        levels = await limiter.levels()
        assert levels.tokens < 20  # emptied (it refills 1,000 a second: a few ms here)
        # The refused request's charge is given back (the server charged nothing), within the burst halved to 5.
        assert levels.requests == pytest.approx(5, abs=0.1)
        assert levels.burst_factor == 0.5
        # The refused request is uncounted: the server charged nothing for it.
        assert (levels.charged_requests, levels.charged_tokens, levels.sent_requests) == (0, 0, 0)
        assert await limiter.acquire(100) == pytest.approx(0.1, abs=0.02)


@pytest.mark.anyio
async def test_scripts_survive_script_flush(
    server: RedisServer, scope: str, client: redis.asyncio.Redis
) -> None:
    async with await _limiter(server, Limits(rpm=600), scope) as limiter:
        assert await limiter.acquire(1) == 0.0
        await client.script_flush()
        assert await limiter.acquire(1) == 0.0  # NOSCRIPT is answered by loading the script again
        assert (await limiter.levels()).charged_requests == 2


@pytest.mark.anyio
async def test_keys_share_one_hash_tag_hide_the_scope_and_expire(
    server: RedisServer, scope: str, client: redis.asyncio.Redis
) -> None:
    async with await _limiter(server, Limits(rpm=600, burst_s=2.0), scope) as limiter:
        await limiter.acquire(1)
    bucket, reserve = limit_keys(scope)
    assert bucket.split("}")[0] == reserve.split("}")[0]
    assert bucket.startswith("{sched:") and "api.test" not in bucket
    assert 60_000 < await client.pttl(bucket) <= 64_000  # 2 x burst + 60 s


@pytest.mark.anyio
async def test_unreachable_redis_is_a_clear_error_without_the_password(scope: str) -> None:
    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(SharedLimitUnavailable) as caught:
        await RedisLimiter.connect(url, Limits(rpm=60), scope=scope)
    message = str(caught.value)
    assert "127.0.0.1" in message and "cannot be shared" in message
    assert "hunter2secret" not in message
    assert isinstance(caught.value, ConfigurationError)
    with pytest.raises(ConfigurationError, match="not a Redis URL"):
        await RedisLimiter.connect("http://127.0.0.1:1", Limits(rpm=60), scope=scope)


@pytest.mark.anyio
async def test_a_redis_restart_pauses_admission_then_it_goes_on(scope: str) -> None:
    with RedisServer() as private:
        limiter = await RedisLimiter.connect(private.url, Limits(rpm=6000), scope=scope, outage_grace_s=1.0)
        async with limiter:
            assert await limiter.acquire(1) == 0.0
            private.stop()
            # Down: no admission without the shared budget, only a wait...
            assert await limiter.acquire(1) == limiter.outage_retry_s
            private.start()
            # ...and back (an empty Redis, scripts not loaded): admission goes on.
            assert await limiter.acquire(1) == 0.0
            private.stop()
            assert await limiter.acquire(1) == limiter.outage_retry_s
            await asyncio.sleep(1.0)
            # Down for longer than the grace: a clear error, never a local budget.
            with pytest.raises(SharedLimitUnavailable, match="cannot be shared"):
                await limiter.acquire(1)
            private.start()
            assert await limiter.acquire(1) == 0.0


async def _hog(limiter: RedisLimiter, cost: int, stop: asyncio.Event) -> int:
    """Take ``cost`` tokens as often as the limit allows, until ``stop``."""
    taken = 0
    while not stop.is_set():
        wait = await limiter.acquire(cost)
        if wait == 0.0:
            taken += 1
        else:
            await asyncio.sleep(wait)
    return taken


async def _big_request_wait(server: RedisServer, scope: str, reserve_after_s: float) -> float | None:
    """Seconds a 100-token request from one process waits while another takes 10 tokens whenever it can."""
    limits = Limits(tpm=12_000, burst_s=0.5)  # 200 tokens a second, holds 100: the big request needs it all
    async with (await _limiter(server, limits, scope, reserve_after_s=reserve_after_s) as big,
                await _limiter(server, limits, scope) as small):
        stop = asyncio.Event()
        hog = asyncio.create_task(_hog(small, 10, stop))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        waited: float | None = None
        while time.monotonic() - started < 2.0:
            wait = await big.acquire(100)
            if wait == 0.0:
                waited = time.monotonic() - started
                break
            await asyncio.sleep(wait)
        stop.set()
        assert await hog > 0
        return waited


@pytest.mark.anyio
async def test_a_big_request_is_not_starved_by_small_ones_from_another_process(
    server: RedisServer, scope: str
) -> None:
    # Without a reservation the small requests keep the bucket from ever filling...
    assert await _big_request_wait(server, scope + "-plain", reserve_after_s=float("inf")) is None
    # ...with one, it waits its turn: its first wait (a refill, 0.5 s), which reserves the room, then a refill.
    waited = await _big_request_wait(server, scope, reserve_after_s=0.1)
    assert waited is not None and waited < 0.5 + 0.5 + 0.4


# ---------------------------------------------------------------------------------------------- processes

_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import openai, structlog
    import scheduler

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from scheduler.transport import OpenAITransport

    base_url, redis_url, count, rpm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sends = []

    class Recording(OpenAITransport):
        async def send(self, endpoint, body, *, timeout):
            sends.append(time.time())
            return await super().send(endpoint, body, timeout=timeout)

    async def main():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
        pool = scheduler.Pool(client=client, model="gpt-4o-mini", limits=scheduler.Limits(rpm=rpm, tpm=10**8),
                              workers=32, redis=redis_url, transport=Recording(client))
        async with client, pool:
            # The SDK's first call blocks the event loop for a few hundred ms (lazy set-up), while the requests
            # already admitted wait to leave: warm it up, as a long-running process is.
            await OpenAITransport(client).send("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 1,
                                               "messages": [{"role": "user", "content": "warm"}]}, timeout=10)
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            results = await asyncio.gather(*(pool.submit(f"request {i}", max_tokens=5, raise_errors=False)
                                             for i in range(count)))
            report = {"ok": sum(r.ok for r in results), "rate_limited": pool.statistics().rate_limited,
                      "sends": sends}
            print("RESULT", json.dumps(report), flush=True)

    asyncio.run(main())
    """
)


@pytest.fixture
def mock_base_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.mock", "--port", str(port), "--rpm", "1200",
                             "--tpm", "none", "--latency-ms", "50"], stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert "http://" in proc.stderr.readline().decode()
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def _mock_stats(base_url: str, reset: bool = False) -> dict[str, object]:
    root = base_url.removesuffix("/v1")
    request = urllib.request.Request(f"{root}/stats/reset" if reset else f"{root}/stats",
                                     method="POST" if reset else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_three_processes_share_one_rpm_limit_without_overshoot(server: RedisServer, mock_base_url: str) -> None:
    rpm, per_process, processes = 1200, 60, 3  # 20 a second; 180 requests: about 8 s after the first burst
    redis_url = f"{server.url.rsplit('/', 1)[0]}/1"  # a database of its own: no other test's limit
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, mock_base_url, redis_url, str(per_process), str(rpm)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        for _ in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        _mock_stats(mock_base_url, reset=True)
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert [child.returncode for child in children] == [0] * processes
    reports = [json.loads(line.removeprefix("RESULT ")) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    stats = _mock_stats(mock_base_url)
    assert stats["rate_limited"] == 0 and sum(r["rate_limited"] for r in reports) == 0
    assert sum(r["ok"] for r in reports) == processes * per_process
    sends = sorted(t for r in reports for t in r["sends"])
    rate = rpm / 60
    # A fresh limit's bucket (half of the burst less the jitter reserve), then the rate.
    first_burst = rate * (1 - 0.25) * RedisLimiter.initial_fill
    steady = (len(sends) - first_burst) / (sends[-1] - sends[0])
    assert steady == pytest.approx(rate, rel=0.02)
    # No one-second window past the first burst holds more than the rate (one more for where a window falls).
    for i, start in enumerate(sends):
        if start - sends[0] >= 1.0:
            in_window = sum(1 for t in sends[i:] if t < start + 1.0)
            assert in_window <= rate + 1
