"""The response cache: reruns answered without the API (memory, SQLite, Redis), single flight, what is cached."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler.cache import CacheBackend, MemoryCache, SqliteCache, cache_key, is_deterministic, open_cache
from scheduler.testing import FakeClock, FakeTransport, answer_for, error
from scheduler.transport import Response

PRICES = {"gpt-4o-mini": {"input": 1000.0, "output": 2000.0}}  # usage 10 + 5 costs $0.02


def make_pool(transport: FakeTransport, clock: FakeClock, cache: Any, **kwargs: Any) -> scheduler.Pool:
    kwargs.setdefault("limits", scheduler.Limits(rpm=6000))
    return scheduler.Pool(transport=transport, clock=clock, model="gpt-4o-mini", rng=random.Random(1), cache=cache,
                          prices=PRICES, **kwargs)


def echo(endpoint: str, body: Mapping[str, Any]) -> Response:
    prompt = body["input"] if "input" in body else body["messages"][0]["content"]
    return answer_for(endpoint, f"answer to {prompt}")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_second_identical_run_sends_nothing_to_the_api(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The pool opens (and closes) a backend named by a path or URL; an instance is the caller's to share.
    spec: Any = {"memory": MemoryCache(), "sqlite": tmp_path / "cache.sqlite3"}.get(backend)
    if backend == "redis":
        spec = request.getfixturevalue("redis_url")
    prompts = ["a", "b", "c"]
    runs = []
    for _ in range(2):
        clock = FakeClock()
        transport = FakeTransport(echo, clock=clock)
        async with clock.autojump(), make_pool(transport, clock, spec) as pool:
            results = await asyncio.gather(*(pool.submit(p, max_tokens=5, temperature=0, custom_id=p)
                                             for p in prompts))
        runs.append((transport, results, pool.statistics()))
    (first_transport, first, first_stats), (second_transport, second, second_stats) = runs
    assert len(first_transport.calls) == 3 and second_transport.calls == []
    assert [r.text for r in second] == [r.text for r in first] == ["answer to a", "answer to b", "answer to c"]
    assert all(r.cached and r.attempts == 0 and r.cost_usd == 0.0 and r.ok for r in second)
    assert [r.custom_id for r in second] == prompts and second[0].model == "gpt-4o-mini"
    assert not any(r.cached for r in first) and first[0].cost_usd == pytest.approx(0.02)
    assert (first_stats.cache_hits, first_stats.cache_misses) == (0, 3)
    assert (second_stats.cache_hits, second_stats.cache_misses, second_stats.succeeded) == (3, 0, 3)
    assert second_stats.cache_saved_usd == pytest.approx(0.06) and second_stats.cost_usd == 0.0
    assert second_stats.attempts == 0


@pytest.mark.anyio
async def test_identical_requests_in_flight_make_one_call() -> None:
    clock = FakeClock()

    async def slow(endpoint: str, body: Mapping[str, Any]) -> Response:
        await clock.sleep(1.0)
        return echo(endpoint, body)

    transport = FakeTransport(slow, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, True) as pool:
        one, two = await asyncio.gather(pool.submit("same", max_tokens=5, temperature=0, custom_id="one"),
                                        pool.submit("same", max_tokens=5, temperature=0, custom_id="two"))
        stats = pool.statistics()
    assert len(transport.calls) == 1
    assert one.text == two.text == "answer to same" and (one.custom_id, two.custom_id) == ("one", "two")
    assert (one.cached, one.attempts) == (False, 1) and (two.cached, two.attempts) == (True, 0)
    assert (stats.cache_hits, stats.cache_misses, stats.succeeded) == (1, 1, 2)


@pytest.mark.anyio
async def test_when_the_first_of_identical_requests_is_cancelled_the_next_one_runs() -> None:
    clock = FakeClock()
    transport = FakeTransport(echo, clock=clock)
    async with clock.autojump(), make_pool(transport, clock, True, limits=scheduler.Limits(rpm=60)) as pool:
        await pool.submit("blocker", max_tokens=5)  # the bucket is empty now: the next jobs wait in the queue
        leader = asyncio.ensure_future(pool.submit("same", max_tokens=5, temperature=0))
        await asyncio.sleep(0)
        followers = [asyncio.ensure_future(pool.submit("same", max_tokens=5, temperature=0)) for _ in range(2)]
        await asyncio.sleep(0)
        leader.cancel()
        results = await asyncio.gather(*followers)
    assert [body["messages"][0]["content"] for _, body in transport.calls] == ["blocker", "same"]
    assert [r.text for r in results] == ["answer to same"] * 2 and [r.cached for r in results] == [False, True]


@pytest.mark.anyio
async def test_a_failed_call_fails_its_followers_and_is_not_cached() -> None:
    cache = MemoryCache()
    for run in range(2):
        clock = FakeClock()
        transport = FakeTransport(lambda e, b: error(400, "invalid_request_error", "bad"), clock=clock)
        async with clock.autojump(), make_pool(transport, clock, cache) as pool:
            results = await asyncio.gather(*(pool.submit("x", max_tokens=5, temperature=0, raise_errors=False)
                                             for _ in range(2)))
        assert len(transport.calls) == 1, run  # one call each run: the failure was shared, never stored
        assert [r.error.code if r.error else None for r in results] == ["request_rejected"] * 2
    assert len(cache) == 0


@pytest.mark.anyio
async def test_only_deterministic_or_marked_requests_use_the_cache() -> None:
    cache = MemoryCache()
    for _ in range(2):
        clock = FakeClock()
        transport = FakeTransport(echo, clock=clock)
        async with clock.autojump(), make_pool(transport, clock, cache) as pool:
            await pool.submit("sampled", max_tokens=5, temperature=0.7)
            await pool.submit("marked", max_tokens=5, cache=True)
            await pool.submit("refused", max_tokens=5, temperature=0, cache=False)
            await pool.submit({"model": "text-embedding-3-small", "input": "embedded"})
            async for _ in pool.map([scheduler.Request({"messages": [{"role": "user", "content": "mapped"}],
                                                        "max_tokens": 5}, cacheable=True)]):
                pass
            async for _ in pool.stream("streamed", max_tokens=5, temperature=0):
                pass
    sent = [body.get("input") or body["messages"][0]["content"] for _, body in transport.calls]
    assert sent == ["sampled", "refused", "streamed"]  # what the second run still sent


@pytest.mark.anyio
async def test_a_broken_cache_sends_requests_to_the_api_with_one_warning() -> None:
    class Broken:
        async def get(self, key: str) -> bytes | None:
            raise ConnectionError("cache down")

        async def set(self, key: str, value: bytes) -> None:
            raise ConnectionError("cache down")

        async def aclose(self) -> None:
            return None

    broken: CacheBackend = Broken()
    clock = FakeClock()
    transport = FakeTransport(echo, clock=clock)
    with capture_logs() as logs:
        async with clock.autojump(), make_pool(transport, clock, broken) as pool:
            results = await asyncio.gather(*(pool.submit(p, max_tokens=5, temperature=0) for p in "abc"))
    assert [r.text for r in results] == ["answer to a", "answer to b", "answer to c"]
    assert [e["event"] for e in logs].count("cache_unavailable") == 1


def test_the_key_is_canonical_and_covers_the_whole_request() -> None:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "x"}]}
    reordered = {"messages": [{"content": "x", "role": "user"}], "temperature": 0, "model": "m"}
    key = cache_key("https://api.openai.com/v1", "/v1/chat/completions", body)
    assert key == cache_key("https://api.openai.com/v1", "/v1/chat/completions", reordered)
    assert key != cache_key("https://api.openai.com/v1", "/v1/chat/completions", {**body, "max_tokens": 5})
    assert key != cache_key("http://127.0.0.1:8000/v1", "/v1/chat/completions", body)
    assert key != cache_key("https://api.openai.com/v1", "/v1/responses", body)
    assert cache_key("", "/v1/chat/completions", {"x": object()}) is None


def test_what_counts_as_deterministic() -> None:
    assert is_deterministic("/v1/chat/completions", {"temperature": 0})
    assert is_deterministic("/v1/chat/completions", {"temperature": 0.0})
    assert not is_deterministic("/v1/chat/completions", {"temperature": False})
    assert not is_deterministic("/v1/chat/completions", {})
    assert is_deterministic("/v1/embeddings", {})


@pytest.mark.anyio
async def test_the_memory_cache_evicts_the_least_recently_used() -> None:
    cache = MemoryCache(max_entries=2)
    await cache.set("a", b"1")
    await cache.set("b", b"2")
    assert await cache.get("a") == b"1"
    await cache.set("c", b"3")
    assert await cache.get("b") is None and await cache.get("a") == b"1" and len(cache) == 2


@pytest.mark.anyio
async def test_sqlite_cache_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.db"
    first = SqliteCache(path)
    await first.set("k", b"v")
    await first.set("k", b"w")
    await first.aclose()
    second = open_cache(str(path))
    assert isinstance(second, SqliteCache)
    assert await second.get("k") == b"w" and await second.get("missing") is None
    await second.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_redis_cache_prefix_and_ttl(redis_url: str) -> None:
    from redis.asyncio import Redis

    from scheduler.cache import RedisCache

    cache = RedisCache(redis_url, prefix="test:", ttl_s=60)
    await cache.set("k", b"v")
    assert await cache.get("k") == b"v" and await cache.get("other") is None
    client = Redis.from_url(redis_url)
    try:
        assert 0 < await client.pttl("test:k") <= 60_000
    finally:
        await client.aclose()
        await cache.aclose()
