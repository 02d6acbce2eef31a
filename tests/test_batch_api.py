"""The Batch API tier: pure planning, the journal, and whole runs through the real openai SDK against the mock."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

import scheduler
from scheduler import ConfigurationError, Request, Result
from scheduler.batch_api import (
    BatchLimits,
    BatchRun,
    Journal,
    Polling,
    Splitter,
    cancel_batches,
    cutover_at,
    online_seconds,
    parts_dir,
    run_batch,
    split,
)
from scheduler.batch_api._journal import replay
from scheduler.cost import PriceTable
from scheduler.mock import MockConfig, MockServer
from scheduler.mock.batch_config import BatchMockConfig
from scheduler.retry import Backoff
from scheduler.sinks import batch_line

CHAT = "/v1/chat/completions"
FAST = BatchMockConfig(step_s=0.01, lines_per_s=5_000)
POLL = Polling(first_s=0.01, cap_s=0.05)


# -- pure planning --------------------------------------------------------------------------------


def test_split_keeps_one_key_a_part_within_the_count_and_byte_limits() -> None:
    items = [("a", 10)] * 5 + [("b", 10)] * 2 + [("a", 10)]
    assert split(items, BatchLimits(max_requests=3)) == [("a", [0, 1, 2]), ("a", [3, 4, 7]), ("b", [5, 6])]
    assert split(items, BatchLimits(max_bytes=25)) == [
        ("a", [0, 1]), ("a", [2, 3]), ("a", [4, 7]), ("b", [5, 6])
    ]
    assert split([], BatchLimits()) == []


def test_splitter_says_which_part_a_line_closed_and_refuses_oversized_lines() -> None:
    splitter = Splitter(BatchLimits(max_requests=2), first_part=7)
    assert [splitter.place("k", 5) for _ in range(3)] == [(7, None), (7, None), (8, 7)]
    assert splitter.place("j", 5) == (9, None)
    assert splitter.open_parts() == [8, 9] and splitter.next_part == 10
    with pytest.raises(ConfigurationError, match="cannot go into a batch input file"):
        Splitter(BatchLimits(max_bytes=10)).place("k", 11)
    with pytest.raises(ConfigurationError, match="max_requests"):
        BatchLimits(max_requests=0)


def test_online_seconds_take_the_binding_limit() -> None:
    assert online_seconds(6_000, 1_000, rpm=3_000, tpm=1_000_000) == 120.0  # requests bind
    assert online_seconds(10, 2_000_000, rpm=3_000, tpm=1_000_000) == 120.0  # tokens bind
    assert online_seconds(10, 10, rpm=None, tpm=None) == 0.0


def test_cutover_leaves_the_online_time_with_safety_and_margin_before_the_deadline() -> None:
    deadline = 6 * 3600.0
    # 60,000 requests at 3,000 RPM: 20 minutes online; times 1.25 is 25 minutes; and a minute to cut over.
    at = cutover_at(deadline, requests=60_000, tokens=0, rpm=3_000, tpm=None)
    assert at == deadline - 25 * 60 - 60
    assert cutover_at(deadline, requests=60_000, tokens=0, rpm=3_000, tpm=None, safety=1.0, margin_s=0) == (
        deadline - 20 * 60
    )
    # Nothing left: cut over only at the very end (less the margin).
    assert cutover_at(deadline, requests=0, tokens=0, rpm=3_000, tpm=100) == deadline - 60
    with pytest.raises(ConfigurationError):
        cutover_at(deadline, requests=1, tokens=1, rpm=1, tpm=1, safety=0.5)


def test_polling_grows_to_its_cap_with_jitter_around_it() -> None:
    polling = Polling(first_s=1.0, cap_s=10.0, factor=2.0, jitter=0.1)
    rng = random.Random(1)
    for quiet, base in [(0, 1.0), (1, 2.0), (3, 8.0), (4, 10.0), (50, 10.0)]:
        delays = [polling.delay(quiet, rng) for _ in range(50)]
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
        assert max(delays) - min(delays) > 0  # jittered, so pollers started together spread out
    with pytest.raises(ConfigurationError):
        Polling(first_s=2.0, cap_s=1.0)


# -- the journal ----------------------------------------------------------------------------------


def test_journal_survives_a_torn_last_line_and_refuses_a_second_opener(tmp_path: Path) -> None:
    path = tmp_path / "state"
    journal = Journal(path)
    journal.append({"type": "run", "v": 1, "run": "r1", "t": 0})
    journal.append({"type": "part", "part": 1, "file": "p", "endpoint": CHAT, "model": "m", "requests": 2,
                    "bytes": 9})
    with pytest.raises(ConfigurationError, match="in use by another run"):
        Journal(path)
    journal.close()
    with path.open("ab") as file:
        file.write(b'{"type": "submit", "par')  # a crash in the middle of a write
    with Journal(path) as reopened:
        assert [r["type"] for r in reopened.records] == ["run", "part"]
        reopened.append({"type": "submit", "part": 1, "try": 1, "t": 5})
    with Journal(path) as again:
        assert [r["type"] for r in again.records] == ["run", "part", "submit"]


def test_journal_refuses_a_file_that_is_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n')
    with pytest.raises(ConfigurationError, match="not a journal record"):
        Journal(path)


def test_replay_tells_in_doubt_running_refused_and_ended_parts() -> None:
    part = {"type": "part", "endpoint": CHAT, "model": "m", "requests": 1, "bytes": 1}
    state = replay([
        {"type": "run", "v": 1, "run": "abc", "t": 0},
        *({**part, "part": n, "file": f"p{n}"} for n in (1, 2, 3, 4)),
        {"type": "submit", "part": 1, "try": 1, "t": 10},  # no batch record: in doubt
        {"type": "submit", "part": 2, "try": 1, "t": 11},
        {"type": "batch", "part": 2, "try": 1, "batch_id": "b2"},
        {"type": "submit", "part": 3, "try": 1, "t": 12},
        {"type": "batch", "part": 3, "try": 1, "batch_id": "b3"},
        {"type": "refused", "part": 3, "try": 1, "batch_id": "b3"},
        {"type": "end", "part": 2, "batch_id": "b2", "status": "completed", "retry": []},
        {"type": "delivered", "part": 2},
        {"type": "some-future-record"},
    ])
    parts = state.parts
    assert state.run_id == "abc"
    assert parts[1].in_doubt and not parts[1].pending and parts[1].tries == 1 and parts[1].submitted_t == 10
    assert parts[2].end is not None and parts[2].delivered and not parts[2].running
    assert parts[3].pending and parts[3].refusals == 1 and parts[3].tries == 1
    assert parts[4].pending and parts[4].tries == 0
    with pytest.raises(ConfigurationError, match="before planning"):
        replay([{"type": "upload", "part": 9, "file_id": "f"}])


# -- whole runs against the mock ------------------------------------------------------------------


@asynccontextmanager
async def mock(batch: BatchMockConfig = FAST) -> AsyncIterator[tuple[MockServer, openai.AsyncOpenAI]]:
    async with (
        MockServer(MockConfig(batch=batch)) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10) as client,
    ):
        yield server, client


def chat(i: int, model: str = "gpt-4o-mini") -> Request:
    body = {"model": model, "messages": [{"role": "user", "content": f"item{i} please"}], "max_tokens": 5}
    return Request(body, CHAT, f"r{i}")


def chats(n: int) -> list[Request]:
    return [chat(i) for i in range(n)]


def run(requests: Iterable[Request], client: openai.AsyncOpenAI, state: Path, **options: Any) -> BatchRun:
    options.setdefault("polling", POLL)
    return run_batch(requests, client=client, state=state, **options)


async def collect(batch_run: BatchRun) -> list[Result]:
    return [result async for result in batch_run]


def journal_types(state: Path) -> list[str]:
    return [orjson.loads(line)["type"] for line in state.read_bytes().splitlines()]


def once(results: list[Result], ids: Iterable[str]) -> None:
    """Every id exactly once among the results."""
    got = [r.custom_id for r in results]
    assert sorted(got) == sorted(ids), "every request exactly once"


@pytest.mark.anyio
async def test_complete_run_yields_every_request_once_with_batch_prices(tmp_path: Path) -> None:
    state = tmp_path / "out.jsonl.batches"
    embeddings = [Request({"model": "text-embedding-3-small", "input": f"text {i}"}, "/v1/embeddings", f"e{i}")
                  for i in range(5)]
    async with mock() as (server, client):
        batch_run = run([*chats(25), *embeddings], client, state, limits=BatchLimits(max_requests=10))
        results = await collect(batch_run)
        once(results, [f"r{i}" for i in range(25)] + [f"e{i}" for i in range(5)])
        assert server.batches.creates == 4  # chat in 10 + 10 + 5, embeddings in one: one model and endpoint a file
        prices = PriceTable()
        for result in results:
            assert result.ok and result.tier == "batch" and result.attempts == 1
            assert result.batch_id in server.batches.batch_ids()
            if result.custom_id.startswith("r"):
                assert f"item{result.custom_id[1:]}" in result.text  # its own answer, not another line's
                assert result.usage is not None and result.cost_usd is not None
                standard = prices.cost("gpt-4o-mini", result.usage)
                assert standard is not None and result.cost_usd == pytest.approx(standard / 2)
            else:
                assert result.endpoint == "/v1/embeddings" and len(result.body["data"]) == 1
        line = batch_line(results[0])
        assert line["scheduler"]["tier"] == "batch" and line["scheduler"]["batch_id"] == results[0].batch_id
        stats = batch_run.statistics()
        assert (stats.requests, stats.finished, stats.succeeded, stats.requests_left) == (30, 30, 30, 0)
        assert [b.status for b in stats.batches] == ["completed"] * 4
        assert stats.cost_usd == pytest.approx(sum(r.cost_usd or 0 for r in results), rel=1e-6)
        assert journal_types(state).count("delivered") == 4
        assert len(list(parts_dir(state).iterdir())) == 4

        # Run again: everything was delivered, so nothing is submitted or yielded.
        assert await collect(run([*chats(25), *embeddings], client, state)) == []
        assert server.batches.creates == 4


@pytest.mark.anyio
async def test_failed_lines_are_retried_in_a_later_batch_up_to_max_attempts(tmp_path: Path) -> None:
    async with mock() as (server, client):
        server.batches.script_line("r3", 500)
        server.batches.script_line("r5", "request_timeout")
        server.batches.script_line("r7", 503, 500)
        server.batches.script_line("r8", 400)
        results = await collect(run(chats(10), client, tmp_path / "s", max_attempts=2))
        once(results, [f"r{i}" for i in range(10)])
        by_id = {r.custom_id: r for r in results}
        first = by_id["r0"].batch_id
        for custom_id in ("r3", "r5"):
            assert by_id[custom_id].ok and by_id[custom_id].attempts == 2
            assert by_id[custom_id].batch_id != first  # answered in the later batch
        exhausted = by_id["r7"]
        assert exhausted.error is not None and exhausted.error.code == "retries_exhausted"
        assert exhausted.status == 500 and exhausted.attempts == 2
        rejected = by_id["r8"]
        assert rejected.error is not None and rejected.error.code == "request_rejected"
        assert rejected.attempts == 1 and rejected.status == 400  # a 4xx is not retried
        assert server.batches.creates == 2


@pytest.mark.anyio
async def test_expired_batch_keeps_what_completed_and_resubmits_the_rest(tmp_path: Path) -> None:
    async with mock() as (server, client):
        server.batches.expire_next(after_lines=3)
        results = await collect(run(chats(10), client, tmp_path / "s"))
        once(results, [f"r{i}" for i in range(10)])
        assert all(r.ok for r in results)
        expired, resubmitted = server.batches.batch_ids()
        assert sorted(r.custom_id for r in results if r.batch_id == expired) == ["r0", "r1", "r2"]
        assert {r.attempts for r in results if r.batch_id == resubmitted} == {2}
        assert (await client.batches.retrieve(expired)).status == "expired"


@pytest.mark.anyio
async def test_token_limit_refusals_hold_batches_back_until_ours_finish(tmp_path: Path) -> None:
    # A part of 10 lines enqueues 10 * 3 tokens ("item1 please" is 12 characters); the limit lets one run at once.
    config = BatchMockConfig(step_s=0.01, lines_per_s=200, enqueued_token_limit=45)
    async with mock(config) as (server, client):
        batch_run = run(chats(30), client, tmp_path / "s", limits=BatchLimits(max_requests=10))
        results = await collect(batch_run)
        once(results, [f"r{i}" for i in range(30)])
        assert all(r.ok for r in results)
        refusals = batch_run.statistics().refusals
        assert refusals >= 1
        assert server.batches.creates == 3 + refusals  # each refusal costs one creation, nothing else
        assert journal_types(tmp_path / "s").count("refused") == refusals


@pytest.mark.anyio
async def test_refusal_with_none_of_ours_running_backs_off_and_retries(tmp_path: Path) -> None:
    async with mock() as (server, client):
        server.batches.refuse_next(2)
        batch_run = run(chats(3), client, tmp_path / "s", refusal_backoff=Backoff(base_s=0.01, cap_s=0.02))
        results = await collect(batch_run)
        once(results, ["r0", "r1", "r2"])
        assert batch_run.statistics().refusals == 2 and server.batches.creates == 3


@pytest.mark.anyio
@pytest.mark.parametrize("crash_after_create", [True, False])
async def test_crash_around_create_then_rerun_never_submits_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_after_create: bool
) -> None:
    state = tmp_path / "s"
    async with mock() as (server, client):
        create = client.batches.create

        async def crashing(**kwargs: Any) -> Any:
            if crash_after_create:
                await create(**kwargs)  # the batch exists; the journal never hears of it
            raise RuntimeError("the process died")

        monkeypatch.setattr(client.batches, "create", crashing)
        with pytest.raises(RuntimeError, match="died"):
            await collect(run(chats(20), client, state, limits=BatchLimits(max_requests=10)))
        assert server.batches.creates == (1 if crash_after_create else 0)
        monkeypatch.undo()

        results = await collect(run(chats(20), client, state, limits=BatchLimits(max_requests=10)))
        once(results, [f"r{i}" for i in range(20)])
        assert server.batches.creates == 2  # the batch created before the crash was found by its metadata
        batch = await client.batches.retrieve(results[0].batch_id or "")
        assert batch.metadata is not None and batch.metadata["scheduler_part"] in ("1", "2")


@pytest.mark.anyio
async def test_a_crash_while_handing_out_results_resumes_without_duplicates(tmp_path: Path) -> None:
    state = tmp_path / "s"
    written: list[str] = []
    async with mock() as (server, client):
        with pytest.raises(KeyboardInterrupt):
            async with contextlib.aclosing(run(chats(10), client, state)) as batch_run:  # type: ignore[type-var]
                async for result in batch_run:
                    written.append(result.custom_id)
                    if len(written) == 4:
                        raise KeyboardInterrupt  # Ctrl-C after 4 of the batch's 10 results were written
        results = await collect(run(chats(10), client, state, done=set(written)))
        once([*results], [f"r{i}" for i in range(10) if f"r{i}" not in written])
        assert server.batches.creates == 1


WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path

    import openai, orjson

    import scheduler
    from scheduler.batch_api import BatchLimits, Polling
    from scheduler.sinks import batch_line

    async def main(base_url: str, state: str, out: str, n: int) -> None:
        path = Path(out)
        done = {orjson.loads(l)["custom_id"] for l in path.read_bytes().splitlines()} if path.exists() else set()
        requests = [
            scheduler.Request({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"item{i}"}],
                               "max_tokens": 5}, "/v1/chat/completions", f"r{i}")
            for i in range(n)
        ]
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
            run = scheduler.run_batch(requests, client=client, state=state, done=done,
                                      limits=BatchLimits(max_requests=20), polling=Polling(first_s=0.02, cap_s=0.05))
            async for result in run:
                os.write(fd, orjson.dumps(batch_line(result)) + b"\\n")

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


@pytest.mark.anyio
async def test_kill_9_while_polling_then_rerun_submits_nothing_twice_and_writes_no_line_twice(
    tmp_path: Path,
) -> None:
    state, out, script = tmp_path / "out.batches", tmp_path / "out.jsonl", tmp_path / "worker.py"
    script.write_text(WORKER)
    # Two parts: r0-r19 take 2 s in the mock, r20-r29 take 1 s; kill once the small one is written.
    async with mock(BatchMockConfig(step_s=0.01, lines_per_s=10)) as (server, client):
        worker = await asyncio.create_subprocess_exec(sys.executable, str(script), server.base_url, str(state),
                                                      str(out), "30")
        try:
            for _ in range(1_500):  # bounded: 30 s
                if out.exists() and out.read_bytes().count(b"\n") >= 10:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the worker wrote no results in time")
            types = journal_types(state)
            assert types.count("batch") == 2 and "end" in types  # one batch still running: polled when killed
        finally:
            with contextlib.suppress(ProcessLookupError):
                worker.kill()  # SIGKILL: no cleanup of any kind
            await worker.wait()
        assert server.batches.creates == 2

        done = {orjson.loads(line)["custom_id"] for line in out.read_bytes().splitlines()}
        async with contextlib.aclosing(run(chats(30), client, state, done=done)) as rerun:  # type: ignore[type-var]
            with out.open("ab") as file:
                async for result in rerun:
                    file.write(orjson.dumps(batch_line(result)) + b"\n")
        written = [orjson.loads(line)["custom_id"] for line in out.read_bytes().splitlines()]
        once([Result(i, CHAT, 200, None) for i in written], [f"r{i}" for i in range(30)])  # 0 duplicate lines
        assert server.batches.creates == 2  # 0 resubmissions


@pytest.mark.anyio
async def test_cancel_batches_of_an_interrupted_run_then_rerun_finishes_the_rest(tmp_path: Path) -> None:
    state = tmp_path / "s"
    async with mock(BatchMockConfig(step_s=0.01, lines_per_s=20)) as (server, client):
        batch_run = run(chats(40), client, state)
        task = asyncio.ensure_future(collect(batch_run))
        for _ in range(500):
            if any(b.status == "in_progress" for b in batch_run.statistics().batches):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ConfigurationError, match="in use"):
            await cancel_batches(state, client=client)  # the running run holds the state
        await asyncio.sleep(0.2)  # a few lines complete
        task.cancel()  # Ctrl-C: the batch keeps running on the API
        with contextlib.suppress(asyncio.CancelledError):
            await task
        [batch_id] = await cancel_batches(state, client=client)
        for _ in range(500):
            if (batch := await client.batches.retrieve(batch_id)).status == "cancelled":
                break
            await asyncio.sleep(0.01)
        assert batch.request_counts is not None and 0 < batch.request_counts.completed < 40
        assert await cancel_batches(state, client=client) == []  # nothing runs any more

        results = await collect(run(chats(40), client, state, max_attempts=2))
        once(results, [f"r{i}" for i in range(40)])
        assert all(r.ok for r in results)
        assert sum(1 for r in results if r.batch_id == batch_id) == batch.request_counts.completed
        assert server.batches.creates == 2 and server.batches.cancels == 1


@pytest.mark.anyio
async def test_stop_cuts_over_handing_back_what_did_not_finish(tmp_path: Path) -> None:
    requests = chats(40)
    async with mock(BatchMockConfig(step_s=0.01, lines_per_s=20)) as (server, client):
        batch_run = run(requests, client, tmp_path / "s", limits=BatchLimits(max_requests=20))
        task = asyncio.ensure_future(collect(batch_run))
        for _ in range(500):
            if sum(b.completed for b in batch_run.statistics().batches) >= 2:
                break
            await asyncio.sleep(0.01)
        batch_run.stop()
        results = await asyncio.wait_for(task, 10)
        handed = batch_run.handed_back
        assert results and handed
        once([*results, *(Result(r.custom_id or "", CHAT, None, None) for r in handed)], [r.custom_id or ""
                                                                                           for r in requests])
        assert all(r.ok for r in results)
        originals = {r.custom_id: r for r in requests}
        assert all(r.body == originals[r.custom_id].body and r.endpoint == CHAT for r in handed)
        assert server.batches.creates == 2 and server.batches.cancels == 2
        statuses = {(await client.batches.retrieve(i)).status for i in server.batches.batch_ids()}
        assert statuses == {"cancelled"}


@pytest.mark.anyio
async def test_lines_a_running_batch_completed_are_not_counted_as_left(tmp_path: Path) -> None:
    # What is left decides when the auto tier cuts over: lines a running batch completed are collected by the cut.
    async with mock(BatchMockConfig(step_s=0.01, lines_per_s=20)) as (_, client):
        batch_run = run(chats(40), client, tmp_path / "s")
        task = asyncio.ensure_future(collect(batch_run))
        for _ in range(500):
            stats = batch_run.statistics()
            if stats.batches and 0 < stats.batches[0].completed < 40:
                break
            await asyncio.sleep(0.01)
        assert stats.finished == 0 and stats.requests_left == 40 - stats.batches[0].completed
        await asyncio.wait_for(task, 10)
        assert batch_run.statistics().requests_left == 0


@pytest.mark.anyio
async def test_planning_memory_does_not_grow_with_the_input(tmp_path: Path) -> None:
    # Stopped before it starts, a run plans every line and submits none: no API call, only the planning's memory.
    async def peak(count: int) -> int:
        requests = (chat(i) for i in range(count))  # a stream, as the CLI reads its input
        batch_run = run(requests, openai.AsyncOpenAI(api_key="x", base_url="http://127.0.0.1:9"),
                        tmp_path / f"s{count}", limits=BatchLimits(max_requests=5_000))
        batch_run.stop()
        tracemalloc.start()
        try:
            assert await collect(batch_run) == []
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = await peak(5_000), await peak(50_000)
    # Ten times the lines: the ids' hashes (8 bytes a line) grow, nothing else does.
    assert large < small + 50_000 * 40, (small, large)


@pytest.mark.anyio
async def test_stop_before_anything_was_submitted_hands_everything_back(tmp_path: Path) -> None:
    async with mock() as (server, client):
        batch_run = run(chats(5), client, tmp_path / "s", done={"r0"})
        batch_run.stop()
        assert await collect(batch_run) == []
        assert [r.custom_id for r in batch_run.handed_back] == ["r1", "r2", "r3", "r4"]
        assert server.batches.creates == 0


@pytest.mark.anyio
async def test_batches_the_api_fails_or_refuses_become_error_results(tmp_path: Path) -> None:
    # The mock takes 5 requests a file and 2,000 bytes an upload; our limits are set too high on purpose.
    async with mock(BatchMockConfig(step_s=0.01, max_requests=5, max_bytes=2_000)) as (server, client):
        results = await collect(run(chats(8), client, tmp_path / "a"))
        once(results, [f"r{i}" for i in range(8)])
        assert {(r.error.code if r.error else None) for r in results} == {"batch_failed"}
        assert all("too_many_tasks" in (r.error.message if r.error else "") for r in results)
        assert server.batches.creates == 1  # a validation failure is final: not submitted again

        big = [Request({**chat(i).body, "messages": [{"role": "user", "content": "x" * 300}]}, CHAT, f"b{i}")
               for i in range(5)]
        results = await collect(run(big, client, tmp_path / "b"))
        assert {(r.error.code if r.error else None) for r in results} == {"batch_failed"}
        assert all("refused the upload" in (r.error.message if r.error else "") for r in results)
        assert server.batches.creates == 1
        assert await collect(run(big, client, tmp_path / "b")) == []  # ended and delivered: a rerun is quiet


@pytest.mark.anyio
async def test_bad_requests_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    async with mock() as (server, client):
        cases: list[tuple[list[Request], str]] = [
            ([Request({"model": "m", "messages": []}, CHAT)], "no custom_id"),
            ([chat(1), chat(1)], "more than once"),
            ([Request({"model": "m", "input": "x"}, "/v1/images", "a")], "does not serve"),
            ([Request({"messages": []}, CHAT, "a")], "names no model"),
        ]
        for index, (requests, message) in enumerate(cases):
            with pytest.raises(ConfigurationError, match=message):
                await collect(run(requests, client, tmp_path / f"s{index}"))
        assert server.batches.creates == 0 and server.batches.uploads == 0
        with pytest.raises(ConfigurationError, match="max_attempts"):
            run_batch([], client=client, state=tmp_path / "x", max_attempts=0)


@pytest.mark.anyio
async def test_model_fills_bodies_without_one_and_done_ids_are_not_planned(tmp_path: Path) -> None:
    async def requests() -> AsyncIterator[Request]:  # an async source is read like a plain one
        for i in range(4):
            yield Request({"messages": [{"role": "user", "content": f"q{i}"}]}, CHAT, f"q{i}")

    async with mock() as (_, client):
        results = await collect(run(requests(), client, tmp_path / "s", model="gpt-4o", done={"q0"}))
        once(results, ["q1", "q2", "q3"])
        assert {r.model for r in results} == {"gpt-4o"}
        assert results[0].cost_usd is not None


def test_run_batch_is_exported() -> None:
    assert scheduler.run_batch is run_batch
