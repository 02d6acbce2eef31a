"""`scheduler run` with the production flags (--budget, --cache, --redis) and the distributed commands,
as subprocesses against the mock server."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import orjson
import pytest
from redis_server import RedisServer, needs_redis
from test_cli import REPO, env, id_counts, read_output, summary, write_input

from scheduler.mock import MockConfig, MockServer

pytestmark = pytest.mark.anyio


def redis_only(test):  # type: ignore[no-untyped-def]
    for mark in needs_redis:
        test = mark(test)
    return test


async def scheduler(*args: str) -> tuple[int, bytes]:
    done = await anyio.run_process([sys.executable, "-m", "scheduler", *args], check=False, cwd=REPO, env=env())
    return done.returncode, done.stderr


def write_deterministic(path: Path, count: int) -> list[str]:
    ids = [f"det-{i}" for i in range(count)]
    with path.open("wb") as file:
        for custom_id in ids:
            body = {"model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": f"question {custom_id}"}]}
            file.write(orjson.dumps({"custom_id": custom_id, "body": body, "method": "POST",
                                     "url": "/v1/chat/completions"}) + b"\n")
    return ids


async def test_a_mixed_model_input_runs_each_model_at_its_own_limit(tmp_path: Path) -> None:
    """Two models, each with its own limit on the mock (gpt-4o: 600 RPM, ten a second; gpt-4o-mini: 6,000 RPM)
    and told so (``--limit gpt-4o=600,...``): the slow model's lines do not hold the fast one's back, and neither
    meets a 429. The output is written as answers come back, so its order tells the pace without a clock."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with source.open("wb") as file:
        for i in range(60):
            model = "gpt-4o" if i < 20 else "gpt-4o-mini"  # the slow model's lines first in the file
            body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"question {i}"}]}
            file.write(orjson.dumps({"custom_id": f"{model}-{i}", "body": body, "method": "POST",
                                     "url": "/v1/chat/completions"}) + b"\n")
    config = MockConfig(rpm=6000, tpm=10_000_000, model_limits={"gpt-4o": (600, 1_000_000)})
    async with MockServer(config) as mock:
        code, stderr = await scheduler("run", str(source), "-o", str(output), "--base-url", mock.base_url,
                                       "--rpm", "6000", "--tpm", "10000000", "--limit", "gpt-4o=600,1000000")
        by_model = mock.stats()["models"]
    assert code == 0, stderr.decode()
    assert {model: figures["rate_limited"] for model, figures in by_model.items()} == {"gpt-4o": 0, "gpt-4o-mini": 0}
    order = ["mini" if record["custom_id"].startswith("gpt-4o-mini") else "4o" for record in read_output(output)]
    assert (order.count("4o"), order.count("mini")) == (20, 40)
    # gpt-4o starts with half its burst (5) and then goes ten a second: its last five requests leave a second in
    # or later. All 40 of gpt-4o-mini, read after them, were answered before (under one bucket of gpt-4o's
    # limit they would be spread over the whole run).
    assert order[-5:] == ["4o"] * 5


async def test_a_budget_stops_the_run_and_a_bigger_one_resumes_it(tmp_path: Path) -> None:
    source, output, prices = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "prices.json"
    ids = write_input(source, 40)
    # A dollar per thousand tokens: each request reserves a few cents, so $0.50 runs only some of them.
    prices.write_bytes(orjson.dumps({"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}))
    async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as mock:
        base = ("--base-url", mock.base_url, "--prices", str(prices), "--workers", "4")
        code, stderr = await scheduler("run", str(source), "-o", str(output), *base, "--budget", "0.5")
        first = id_counts(output)
        assert code == 3, stderr.decode()
        assert 0 < len(first) < len(ids)
        assert summary(stderr)["cost_usd"] <= 0.5
        code, stderr = await scheduler("run", str(source), "-o", str(output), *base, "--budget", "100")
    assert code == 0, stderr.decode()
    assert id_counts(output) == dict.fromkeys(ids, 1)


async def test_a_second_identical_run_with_the_cache_sends_nothing(tmp_path: Path) -> None:
    source, cache = tmp_path / "in.jsonl", tmp_path / "cache.db"
    ids = write_deterministic(source, 12)
    async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as mock:
        for name in ("first.jsonl", "second.jsonl"):
            code, stderr = await scheduler("run", str(source), "-o", str(tmp_path / name), "--base-url",
                                           mock.base_url, "--cache", str(cache))
            assert code == 0, stderr.decode()
        assert mock.stats()["requests"] == len(ids)  # all from the first run
    second = read_output(tmp_path / "second.jsonl")
    assert {r["custom_id"] for r in second} == set(ids)
    assert all(r["scheduler"].get("cached") for r in second)


async def test_unusable_production_flags_exit_2(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 2)
    out = str(tmp_path / "out.jsonl")
    for args in (("--redis", "redis://127.0.0.1:1/0"),  # no limits to share
                 ("--cache", "redis"),                  # no --redis to keep it in
                 ("--prices", str(tmp_path / "missing.json"))):
        code, stderr = await scheduler("run", str(source), "-o", out, "--base-url", "http://127.0.0.1:9/v1", *args)
        assert code == 2 and b"error:" in stderr, (args, stderr)


@redis_only
async def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_input(source, 2)
    code, stderr = await scheduler("run", str(source), "-o", str(tmp_path / "o.jsonl"), "--base-url",
                                   "http://127.0.0.1:9/v1", "--rpm", "60", "--redis", "redis://:pw@127.0.0.1:1/0")
    assert code == 2
    assert b"127.0.0.1:1" in stderr and b"pw" not in stderr


@redis_only
async def test_two_runs_share_one_budget_through_redis(tmp_path: Path) -> None:
    with RedisServer() as redis:
        async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as mock:
            outputs = []
            async with anyio.create_task_group() as tg:
                for part in range(2):
                    source = tmp_path / f"part{part}.jsonl"
                    write_input(source, 10)
                    outputs.append(tmp_path / f"out{part}.jsonl")
                    tg.start_soon(scheduler, "run", str(source), "-o", str(outputs[-1]), "--base-url",
                                  mock.base_url, "--rpm", "6000", "--redis", redis.url)
            assert mock.stats()["rate_limited"] == 0
    assert [sum(id_counts(o).values()) for o in outputs] == [10, 10]


@redis_only
async def test_enqueue_worker_collect_through_the_scheduler_command(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 15)
    with RedisServer() as redis:
        async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as mock:
            common = ("--redis", redis.url, "--stream", "t")
            assert (await scheduler("enqueue", str(source), *common))[0] == 0
            code, stderr = await scheduler("worker", *common, "--base-url", mock.base_url, "--rpm", "6000",
                                           "--burst")
            assert code == 0, stderr.decode()
            assert (await scheduler("collect", *common, "-o", str(output)))[0] == 0
    assert id_counts(output) == dict.fromkeys(ids, 1)
