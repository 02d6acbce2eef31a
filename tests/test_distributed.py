"""Distributed bulk runs through a Redis Stream, against a real redis-server and the mock API server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from redis_server import RedisServer, free_port, needs_redis

from scheduler import Limits
from scheduler.distributed import DEAD_LETTERED, GROUP, StreamKeys, WorkerOptions, enqueue, run_worker
from scheduler.distributed_collect import collect, status
from scheduler.mock import MockConfig, MockServer

pytestmark = needs_redis

def _cli(*args: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "OPENAI_API_KEY": "sk-mock-key-for-tests", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "scheduler", *args], env=env, text=True, **popen)


def _cli_run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def stream() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(server.url)
    yield connection
    await connection.aclose()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(rpm=None, tpm=None, latency_ms=5)) as running:
        yield running


def _write_input(path: Path, count: int, start: int = 0) -> Path:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 5}}
             for i in range(start, start + count)]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def _records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def _work(url: str, mock: MockServer, stream: str, **options: Any) -> int:
    return await run_worker(
        url, stream=stream, base_url=mock.base_url, api_key="sk-mock-key-for-tests", model="gpt-4o-mini",
        limits=Limits(rpm=60_000, tpm=10_000_000), workers=8,
        options=WorkerOptions(burst=True, **options),
    )


@pytest.mark.anyio
async def test_enqueue_is_idempotent_and_takes_every_input_form(
    server: RedisServer, client: redis.asyncio.Redis, stream: str, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": '
        '[{"role": "user", "content": "hi"}]}}\n'
        '{"messages": [{"role": "user", "content": "bare"}], "metadata": {"row": 7}, "priority": 2}\n'
        '{"prompt": "plain", "custom_id": "c"}\n'
        "not json\n"
        '{"prompt": "again", "custom_id": "a"}\n'
    )
    first = await enqueue(client, source, stream=stream)
    assert (first.added, first.invalid, first.skipped) == (3, 1, 1)  # the repeated "a" is skipped
    again = await enqueue(client, source, stream=stream)
    assert (again.added, again.invalid, again.skipped) == (0, 0, 5)
    keys = StreamKeys.of(stream)
    entries = await client.xrange(keys.jobs)
    assert [fields[b"custom_id"] for _, fields in entries] == [b"a", b"line-2", b"c"]
    bare = entries[1][1]
    assert orjson.loads(bare[b"body"]) == {"messages": [{"role": "user", "content": "bare"}]}  # model: worker's
    assert (bare[b"priority"], orjson.loads(bare[b"metadata"])) == (b"2", {"row": 7})
    now = await status(client, stream=stream)
    assert (now.enqueued, now.done, now.failed, now.waiting, now.in_progress) == (4, 1, 1, 3, 0)
    invalid = orjson.loads(await client.hget(keys.results, "line-4"))
    assert invalid["error"]["code"] == "invalid_request"


@pytest.mark.anyio
async def test_a_worker_runs_the_stream_and_collect_writes_each_result_once(
    server: RedisServer, client: redis.asyncio.Redis, mock: MockServer, stream: str, tmp_path: Path
) -> None:
    await enqueue(client, _write_input(tmp_path / "in.jsonl", 30), stream=stream)
    assert await _work(server.url, mock, stream) == 0
    now = await status(client, stream=stream)
    assert (now.enqueued, now.done, now.failed, now.in_progress, now.waiting, now.consumers) == (30, 30, 0, 0, 0, 0)
    output = tmp_path / "out.jsonl"
    assert (await collect(client, output, stream=stream)).written == 30
    records = _records(output)
    assert sorted(r["custom_id"] for r in records) == sorted(f"req-{i}" for i in range(30))
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
    # Collecting again writes nothing; done ids are not enqueued again.
    assert (await collect(client, output, stream=stream)).written == 0
    assert (await enqueue(client, _write_input(tmp_path / "more.jsonl", 32), stream=stream)).added == 2
    assert mock.stats()["ok"] == 30


@pytest.mark.anyio
async def test_a_result_stored_by_a_worker_that_died_before_acking_is_not_requested_again(
    server: RedisServer, client: redis.asyncio.Redis, mock: MockServer, stream: str, tmp_path: Path
) -> None:
    keys = StreamKeys.of(stream)
    await enqueue(client, _write_input(tmp_path / "in.jsonl", 1), stream=stream)
    # A worker took the entry, stored its result, and died before XACK.
    await client.xreadgroup(GROUP, "ghost", {keys.jobs: ">"}, count=1)
    await client.hset(keys.results, "req-0", orjson.dumps({"custom_id": "req-0", "error": None}))
    assert await _work(server.url, mock, stream, claim_idle_s=0.1) == 0
    assert mock.stats()["requests"] == 0
    assert (await status(client, stream=stream)).in_progress == 0


@pytest.mark.anyio
async def test_a_poison_entry_is_dead_lettered_after_max_deliveries(
    server: RedisServer, client: redis.asyncio.Redis, mock: MockServer, stream: str, tmp_path: Path
) -> None:
    keys = StreamKeys.of(stream)
    await enqueue(client, _write_input(tmp_path / "in.jsonl", 3), stream=stream)
    # An entry no worker can run: its body is not JSON (written by something other than enqueue).
    await client.sadd(keys.enqueued, "poison")
    await client.xadd(keys.jobs, {"custom_id": "poison", "endpoint": "/v1/chat/completions", "body": "{oops"})
    assert await _work(server.url, mock, stream, claim_idle_s=0.1, max_deliveries=2) == 0
    now = await status(client, stream=stream)
    assert (now.enqueued, now.done, now.failed, now.dead, now.in_progress, now.waiting) == (4, 4, 1, 1, 0, 0)
    record = orjson.loads(await client.hget(keys.results, "poison"))
    assert record["error"]["code"] == DEAD_LETTERED
    dead = await client.xrange(keys.dead)
    assert len(dead) == 1
    assert (dead[0][1][b"custom_id"], dead[0][1][b"deliveries"], dead[0][1][b"body"]) == (b"poison", b"3", b"{oops")
    assert mock.stats()["ok"] == 3


@pytest.fixture
def mock_process() -> Iterator[str]:
    """The mock API in its own process, answering after 300 ms, so a killed worker has requests in flight."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.mock", "--port", str(port), "--rpm", "none",
                             "--tpm", "none", "--latency-ms", "300"], stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert "http://" in proc.stderr.readline().decode()
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def _mock_stats(base_url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return orjson.loads(response.read())  # type: ignore[no-any-return]


def test_a_killed_worker_s_requests_are_claimed_and_every_result_is_written_once(
    server: RedisServer, mock_process: str, stream: str, tmp_path: Path
) -> None:
    count, in_flight = 60, 4
    source = _write_input(tmp_path / "in.jsonl", count)
    enqueued = _cli_run("enqueue", str(source), "--redis", server.url, "--stream", stream)
    assert enqueued.returncode == 0, enqueued.stderr
    assert "enqueued 60" in enqueued.stdout
    worker = ["worker", "--redis", server.url, "--stream", stream, "--base-url", mock_process, "--rpm", "60000",
              "--claim-idle", "1"]
    doomed = _cli(*worker, "--workers", str(in_flight), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while _done(server, stream) < 10:  # well under way, with requests in flight
            assert time.monotonic() < deadline and doomed.poll() is None
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)
    assert _done(server, stream) < count
    survivor = _cli_run(*worker, "--workers", "16", "--burst")
    assert survivor.returncode == 0, survivor.stderr
    assert "entries_claimed" in survivor.stderr
    output = tmp_path / "out.jsonl"
    collected = _cli_run("collect", "--redis", server.url, "--stream", stream, "-o", str(output))
    assert collected.returncode == 0, collected.stderr
    records = _records(output)
    assert sorted(r["custom_id"] for r in records) == sorted(f"req-{i}" for i in range(count))
    assert all(r["error"] is None for r in records)
    # An API call is repeated only for what the killed worker had in flight.
    assert count <= _mock_stats(mock_process)["admitted"] <= count + in_flight
    shown = _cli_run("collect", "--redis", server.url, "--stream", stream, "--status")
    assert shown.returncode == 0 and "enqueued 60  done 60 (failed 0, dead 0)  in progress 0  waiting 0" in shown.stdout


def _done(server: RedisServer, stream: str) -> int:
    import redis as sync_redis

    with sync_redis.Redis.from_url(server.url) as connection:
        return int(connection.hlen(StreamKeys.of(stream).results))
