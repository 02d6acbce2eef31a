"""The two stores agree, and the Redis store survives what Redis does to it.

One trace, two stores: a seeded random sequence of admissions, sends, header syncs, refunds and 429s from two
processes, applied at the same virtual instants to the in-process store and to Redis (its scripts on virtual
time), must give the same answers and leave the same state. The few differences on purpose are listed in
``test_known_divergences``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio
from redis_server import RedisServer, free_port, needs_redis

from scheduler.admission import BucketParams, MemoryStore
from scheduler.admission.redis_store import RedisStore, SharedLimitUnavailable
from scheduler.errors import ConfigurationError, LimiterUnavailable
from scheduler.testing import FakeClock

pytestmark = [*needs_redis, pytest.mark.anyio]

PARAMS = BucketParams(rates={"requests": 10.0, "tokens": 1000.0}, burst_s=1.0, keep=0.0,
                      fill={"requests": 1.0, "tokens": 0.5}, ttl_s=62.0)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
async def client(server: RedisServer) -> Any:
    connection = redis.asyncio.Redis.from_url(server.url)
    yield connection
    await connection.aclose()


def trace(seed: int, steps: int) -> list[tuple[float, str, dict[str, Any]]]:
    """A random sequence of (time step, operation, arguments) from two owners."""
    rng = random.Random(seed)
    out: list[tuple[float, str, dict[str, Any]]] = []
    sent = 0.0
    for _ in range(steps):
        dt = rng.choice([0.0, 0.0, 0.01, 0.05, 0.2, 1.0])
        owner = rng.choice(["a", "b"])
        tokens = float(rng.choice([1, 40, 120, 400, 1500]))
        costs = {"requests": 1.0, "tokens": tokens, "raw": tokens}
        pick = rng.random()
        if pick < 0.45:
            out.append((dt, "acquire", {"costs": costs, "floor": rng.choice([0.0, 0.0, 0.2]), "owner": owner,
                                        "claim": rng.random() < 0.3}))
        elif pick < 0.7:
            sent += tokens
            out.append((dt, "wire", {"costs": costs}))
        elif pick < 0.85:
            out.append((dt, "sync", {"bounds": {"requests": rng.uniform(-2, 12), "tokens": rng.uniform(-100, 1200)},
                                     "marks": {"requests": 0.0, "tokens": rng.uniform(0, sent)},
                                     "learned": rng.choice([{}, {"requests": 420.0}]),
                                     "widen": 0.01}))
        elif pick < 0.95:
            out.append((dt, "give_back", {"amounts": costs, "uncount": True,
                                          "empty": rng.choice([(), ("tokens",), ("requests", "tokens")]),
                                          "shrink": 0.5, "min_burst": 0.25}))
        else:
            out.append((dt, "give_back", {"amounts": {"tokens": tokens / 2}, "uncount": True, "empty": (),
                                          "shrink": 1.0, "min_burst": 1.0}))
    return out


async def replay(store: Any, clock: FakeClock, key: str, steps: list[tuple[float, str, dict[str, Any]]]) -> list[Any]:
    answers: list[Any] = []
    for dt, op, args in steps:
        clock.advance(dt)
        if op == "acquire":
            wait, binding = await store.acquire(key, PARAMS, args["costs"], args["floor"], args["owner"],
                                                args["claim"], 0.5)
            answers.append((round(wait, 6), binding))
        elif op == "wire":
            mark = store.wire(key, args["costs"])
            answers.append(dict(mark if isinstance(mark, dict) else await mark))
        elif op == "sync":
            await store.sync(key, PARAMS, args["bounds"], args["marks"], args["learned"], args["widen"])
        else:
            await store.give_back(key, PARAMS, args["amounts"], args["uncount"], args["empty"], args["shrink"],
                                  args["min_burst"])
    state = await store.state(key, PARAMS)
    answers.append(({k: round(v, 6) for k, v in state.levels.items()}, round(state.burst, 6), state.learned,
                    {k: round(v, 6) for k, v in state.charged.items()},
                    {k: round(v, 6) for k, v in state.sent.items()}))
    return answers


@pytest.mark.parametrize("seed", range(4))
async def test_one_trace_gives_the_same_answers_and_state_on_both_stores(client: Any, seed: int) -> None:
    steps = trace(seed, 300)
    memory_clock, redis_clock = FakeClock(5000.0), FakeClock(5000.0)
    in_memory = await replay(MemoryStore(memory_clock), memory_clock, "scope", steps)
    in_redis = await replay(RedisStore(client, keep=0.0, clock=redis_clock, virtual_time=True), redis_clock,
                            f"trace-{uuid.uuid4().hex}", steps)
    assert in_redis == in_memory
    # The trace took both ways: admissions, and refusals with their waits.
    decisions = [a for a in in_memory[:-1] if isinstance(a, tuple)]
    assert sum(a[0] == 0.0 for a in decisions) >= 5 and sum(a[0] > 0.0 for a in decisions) >= 5


async def test_known_divergences(client: Any) -> None:
    """What differs between the stores on purpose."""
    shared = RedisStore(client)
    # A store shared by several processes keeps a quarter of each burst free: their requests leave for the
    # server in a slightly different order and timing than they were admitted in.
    assert (shared.shared, shared.keep) == (True, 0.25)
    assert (MemoryStore(FakeClock()).shared, MemoryStore(FakeClock()).keep) == (False, 0.0)
    # Redis' own clock, not the caller's, unless a test asks for virtual time.
    assert b'"now"' not in shared._params(PARAMS)


async def test_scripts_survive_script_flush(client: Any) -> None:
    store, key = RedisStore(client, clock=FakeClock()), f"flush-{uuid.uuid4().hex}"
    assert (await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5))[0] == 0.0
    await client.script_flush()
    assert (await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5))[0] == 0.0  # reloaded
    assert (await store.state(key, PARAMS)).charged["requests"] == 2


async def test_keys_share_one_hash_tag_hide_the_scope_and_expire(client: Any) -> None:
    store, key = RedisStore(client), f"ttl-{uuid.uuid4().hex}"
    params = BucketParams(rates={"requests": 10.0}, burst_s=2.0, ttl_s=2 * 2.0 + 60.0)
    await store.acquire(key, params, {"requests": 1.0}, 0.0, "a", False, 0.5)
    names = sorted(k.decode() for k in await client.keys(f"*{key}*"))
    assert names == [f"{{sched:{key}}}:bucket"]
    assert 60_000 < await client.pttl(names[0]) <= 64_000  # 2 x burst + 60 s


async def test_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(SharedLimitUnavailable) as caught:
        await RedisStore.connect(url)
    message = str(caught.value)
    assert "127.0.0.1" in message and "cannot be shared" in message and "hunter2secret" not in message
    assert isinstance(caught.value, ConfigurationError)
    with pytest.raises(ConfigurationError, match="not a Redis URL"):
        await RedisStore.connect("http://127.0.0.1:1")


async def test_an_outage_pauses_admission_then_past_its_grace_stops_the_run() -> None:
    clock = FakeClock()
    with RedisServer() as private:
        store = await RedisStore.connect(private.url, outage_grace_s=30.0, clock=clock)
        key = f"outage-{uuid.uuid4().hex}"
        try:
            assert (await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5))[0] == 0.0
            private.stop()
            # Down: no admission without the shared budget, only a wait...
            assert (await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5))[0] == 0.5
            private.start()
            # ...and back (an empty Redis, scripts not loaded): admission goes on.
            assert (await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5))[0] == 0.0
            private.stop()
            assert (await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5))[0] == 0.5
            clock.advance(30.0)
            # Down past the grace: the run stops with a clear error, never a local budget.
            with pytest.raises(LimiterUnavailable, match="cannot be shared"):
                await store.acquire(key, PARAMS, {"requests": 1.0}, 0.0, "a", False, 0.5)
        finally:
            await store.aclose()


# ---------------------------------------------------------------------------------------------- processes

_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    import openai, structlog
    import scheduler

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    base_url, redis_url, count, rpm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def main():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
        pool = scheduler.Pool(client=client, model="gpt-4o-mini", limits=scheduler.Limits(rpm=rpm, tpm=10**8),
                              workers=32, redis=redis_url)
        async with client, pool:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            results = await asyncio.gather(*(pool.submit(f"request {i}", max_tokens=5, raise_errors=False)
                                             for i in range(count)))
            print("RESULT", json.dumps({"ok": sum(r.ok for r in results),
                                        "rate_limited": pool.statistics().rate_limited}), flush=True)

    asyncio.run(main())
    """
)


def test_three_processes_share_one_limit_without_a_429(server: RedisServer) -> None:
    """No rate is measured here (the benchmark does: benchmarks/bench_shared_limit.py); what must hold on any
    machine is that three processes each given the whole limit never overshoot it together."""
    rpm, per_process, processes = 1200, 30, 3
    port = free_port()
    mock = subprocess.Popen([sys.executable, "-m", "scheduler.mock", "--port", str(port), "--rpm", str(rpm),
                             "--tpm", "none", "--latency-ms", "20"], stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}/v1"
    redis_url = f"{server.url.rsplit('/', 1)[0]}/1"  # a database of its own
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    children: list[subprocess.Popen[str]] = []
    try:
        assert mock.stderr is not None and "http://" in mock.stderr.readline().decode()
        children = [subprocess.Popen([sys.executable, "-c", _CHILD, base_url, redis_url, str(per_process), str(rpm)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
                    for _ in range(processes)]
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
            stats = json.loads(response.read())
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
        mock.terminate()
        mock.wait(10)
        if mock.stderr is not None:
            mock.stderr.close()
    reports = [json.loads(line.removeprefix("RESULT ")) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert sum(r["ok"] for r in reports) == processes * per_process
    assert stats["rate_limited"] == 0 and sum(r["rate_limited"] for r in reports) == 0


async def test_a_shared_limit_gone_mid_run_stops_the_pool_with_a_clear_error() -> None:
    import scheduler
    from scheduler.testing import FakeTransport

    clock = FakeClock()
    with RedisServer() as private:
        store = await RedisStore.connect(private.url, outage_grace_s=5.0, clock=clock)
        limiter = scheduler.Limiter(scheduler.Limits(rpm=60), store=store, clock=clock)
        async with clock.autojump(), scheduler.Pool(transport=FakeTransport(clock=clock), model="m", clock=clock,
                                                    limiter=limiter) as pool:
            assert (await pool.submit("before", max_tokens=5)).ok
            private.stop()
            results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5, raise_errors=False)
                                             for i in range(3)))
    assert [r.error.code for r in results if r.error] == ["limiter_unavailable"] * 3
    assert pool.statistics().stopped is not None and "Redis" in pool.statistics().stopped
