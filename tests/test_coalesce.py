"""Embeddings coalescing: one-text jobs queued together go out as one request, through the real SDK to the mock
(and to a scripted server for answers the mock never gives); each job still settles exactly once."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import orjson
import pytest
from aiohttp import web
from mock_client import running
from test_cli import read_output, run, summary

import scheduler
from scheduler import errors
from scheduler.coalesce import Coalescing, answer_problem, coalesce_key, share_usage, split_answer
from scheduler.mock import MockConfig, MockServer, embedding_of

pytestmark = pytest.mark.anyio

MODEL = "text-embedding-3-small"
FAST = scheduler.Limits(rpm=100_000, tpm=10_000_000)


def close(vector: list[float], text: str) -> bool:
    return all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(vector, embedding_of(text), strict=True))


def embeddings_stats(server: scheduler.mock.MockServer) -> dict[str, object]:
    stats: dict[str, object] = server.stats()["embeddings"]
    return stats


# -- the rules ---------------------------------------------------------------------------------------------------


def test_shares_add_up_to_the_total_in_proportion() -> None:
    assert share_usage(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(share_usage(1_001, [7, 13, 2, 40])) == 1_001
    assert share_usage(100, [30, 70]) == [30, 70]
    assert share_usage(5, [0, 0]) in ([3, 2], [2, 3])
    assert share_usage(0, [4, 5]) == [0, 0]


def test_only_one_text_embeddings_requests_ride_and_parameters_must_match() -> None:
    one = coalesce_key("/v1/embeddings", {"model": MODEL, "input": "a"})
    assert one is not None
    assert coalesce_key("/v1/embeddings", {"input": ["b"], "model": MODEL}) == one  # same parameters
    assert coalesce_key("/v1/embeddings", {"model": MODEL, "input": "a", "dimensions": 64}) != one
    assert coalesce_key("/v1/embeddings", {"model": MODEL, "input": ["a", "b"]}) is None  # already a batch
    assert coalesce_key("/v1/embeddings", {"model": MODEL, "input": [1, 2, 3]}) is None  # token ids
    assert coalesce_key("/v1/chat/completions", {"model": MODEL, "input": "a"}) is None


def test_an_answer_is_split_by_index_into_answers_the_sdk_reads() -> None:
    body = {"object": "list", "model": MODEL, "usage": {"prompt_tokens": 9, "total_tokens": 9},
            "data": [{"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
                     {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}]}
    assert answer_problem(body, 2) is None
    assert answer_problem(body, 3) is not None
    assert answer_problem({"data": [body["data"][0], body["data"][0]]}, 2) is not None  # index 1 twice
    (first, first_usage), (second, second_usage) = split_answer(body, [1, 2])
    assert first["data"][0]["embedding"] == [1.0, 0.0] and second["data"][0]["embedding"] == [0.0, 1.0]
    assert first_usage is not None and second_usage is not None
    assert (first_usage.prompt_tokens, second_usage.prompt_tokens) == (3, 6)
    for part in (first, second):
        parsed = openai.types.CreateEmbeddingResponse.model_validate(part)
        assert parsed.data[0].index == 0 and parsed.usage.total_tokens == parsed.usage.prompt_tokens


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_inputs"):
        Coalescing(max_inputs=4096)
    with pytest.raises(ValueError):
        Coalescing(linger_s=-1)


# -- through the SDK to the mock ---------------------------------------------------------------------------------


async def test_a_thousand_texts_go_out_as_one_request_and_each_vector_lands_on_its_text() -> None:
    texts = [f"the text number {i}" for i in range(1_000)]
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=FAST) as pool:
            vectors = await pool.embed(texts)
            stats = pool.statistics()
        assert embeddings_stats(server)["requests"] == 1
        mock_tokens = server.stats()["prompt_tokens"]
    assert all(close(vector, text) for vector, text in zip(vectors, texts, strict=True))
    assert (stats.succeeded, stats.attempts, stats.coalesced_requests, stats.coalesced_jobs) == (1_000, 1, 1, 1_000)
    assert stats.prompt_tokens == mock_tokens  # the usage is counted once, not once per text


async def test_each_result_has_its_own_share_of_the_usage_and_says_it_was_coalesced() -> None:
    texts = ["short", "a somewhat longer text than the first one", "mid length text"]
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=FAST,
                                  prices={MODEL: {"input": 1.0, "output": 0.0}}) as pool:
            results = await asyncio.gather(*(pool.submit({"model": MODEL, "input": t}, custom_id=t) for t in texts))
        total = server.stats()["prompt_tokens"]
    assert [r.custom_id for r in results] == texts
    assert all(r.coalesced == 3 and r.attempts == 1 for r in results)
    assert sum(r.usage.prompt_tokens for r in results if r.usage) == total
    shares = [r.usage.prompt_tokens for r in results if r.usage]
    assert shares[1] > shares[2] > shares[0]  # in proportion to each text's own size
    assert sum(r.cost_usd or 0.0 for r in results) == pytest.approx(total / 1e6)
    line = scheduler.sinks.batch_line(results[0])
    assert line["scheduler"]["coalesced"] == 3
    assert openai.types.CreateEmbeddingResponse.model_validate(results[0].body).data[0].index == 0


async def test_without_coalescing_each_text_is_a_request() -> None:
    texts = [f"text {i}" for i in range(20)]
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=FAST, coalesce=False) as pool:
            vectors = await pool.embed(texts)
        assert embeddings_stats(server)["requests"] == 20
    assert all(close(vector, text) for vector, text in zip(vectors, texts, strict=True))


async def test_different_parameters_and_bounds_make_separate_requests() -> None:
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=FAST, coalesce=Coalescing(max_inputs=4)) as pool:
            short = pool.embed([f"a{i}" for i in range(10)], dimensions=4)
            full = pool.embed([f"b{i}" for i in range(3)])
            small, large = await asyncio.gather(short, full)
        per_request = embeddings_stats(server)["inputs_per_request"]
    assert all(len(v) == 4 for v in small) and all(len(v) == 8 for v in large)
    assert per_request == {"4": 2, "2": 1, "3": 1}  # 10 texts in fours; the other parameters apart


async def test_a_combined_request_carries_no_more_than_the_token_bucket_holds() -> None:
    # 6,000 tokens a minute hold 100 tokens a second; each text is about 30 tokens, so at most 3 ride together.
    texts = [f"{i} " + "word " * 28 for i in range(6)]
    limits = scheduler.Limits(rpm=100_000, tpm=6_000)
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=limits, coalesce=Coalescing(linger_s=0.0)) as pool:
            vectors = await pool.embed(texts)
        per_request = embeddings_stats(server)["inputs_per_request"]
    assert isinstance(per_request, dict) and max(int(size) for size in per_request) <= 3
    assert all(close(v, t) for v, t in zip(vectors, texts, strict=True))


async def test_one_bad_input_fails_only_its_own_job() -> None:
    texts = [f"fine text {i}" for i in range(16)]
    bad = "too long " * 40
    texts.insert(5, bad)
    async with running(MockConfig(rpm=100_000, tpm=10_000_000, embedding_input_limit=50)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=FAST) as pool:
            results = await asyncio.gather(*(pool.submit({"model": MODEL, "input": t}, custom_id=str(i),
                                                         raise_errors=False) for i, t in enumerate(texts)))
        sent = embeddings_stats(server)["requests"]
    failed = [r for r in results if not r.ok]
    assert [r.custom_id for r in failed] == ["5"]
    assert failed[0].error is not None and failed[0].error.code == errors.RequestRejected.code
    assert "maximum input length" in failed[0].error.message
    assert all(close(r.body["data"][0]["embedding"], texts[int(r.custom_id)]) for r in results if r.ok)
    # Halving: the bad text is found in about 2 log2(17) requests, not 17.
    assert isinstance(sent, int) and sent <= 2 * math.ceil(math.log2(len(texts))) + 1


async def test_a_failed_combined_request_is_retried_as_a_whole() -> None:
    texts = [f"text {i}" for i in range(30)]
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        server.inject("server_error:503", "drop", "bad_shape")
        async with scheduler.Pool(client, model=MODEL, limits=FAST,
                                  backoff=scheduler.Backoff(base_s=0.01, cap_s=0.02)) as pool:
            results = await asyncio.gather(*(pool.submit({"model": MODEL, "input": t}) for t in texts))
        assert embeddings_stats(server)["inputs_per_request"] == {"30": 1}  # only the last attempt was answered
    assert all(r.ok and r.attempts == 4 and r.coalesced == 30 for r in results)
    assert all(close(r.body["data"][0]["embedding"], t) for r, t in zip(results, texts, strict=True))


async def test_a_rate_limited_combined_request_waits_and_is_sent_again() -> None:
    texts = [f"text {i}" for i in range(12)]
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        server.inject("retry_after_long:0.05")
        async with scheduler.Pool(client, model=MODEL, limits=FAST) as pool:
            vectors = await pool.embed(texts)
            stats = pool.statistics()
    assert stats.rate_limited == 1 and stats.succeeded == 12
    assert all(close(v, t) for v, t in zip(vectors, texts, strict=True))


async def test_a_rider_whose_deadline_passes_fails_alone_and_the_others_get_their_vectors() -> None:
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        server.inject("slow:600")
        async with scheduler.Pool(client, model=MODEL, limits=FAST) as pool:
            hurried = pool.submit({"model": MODEL, "input": "in a hurry"}, timeout_s=0.2, raise_errors=False)
            patient = [pool.submit({"model": MODEL, "input": f"patient {i}"}) for i in range(5)]
            first, *others = await asyncio.gather(hurried, *patient)
            stats = pool.statistics()
    assert first.error is not None and first.error.code == errors.DeadlineExceeded.code
    assert all(r.ok and r.coalesced == 6 for r in others)
    assert (stats.succeeded, stats.failed, stats.attempts) == (5, 1, 1)


async def test_callers_that_leave_are_dropped_and_a_request_nobody_waits_for_is_cancelled() -> None:
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        server.inject("slow:5000")
        async with scheduler.Pool(client, model=MODEL, limits=FAST) as pool:
            tasks = [asyncio.create_task(pool.submit({"model": MODEL, "input": f"t{i}"})) for i in range(4)]
            while pool.statistics().in_flight == 0:
                await asyncio.sleep(0.01)
            tasks[0].cancel()
            await asyncio.sleep(0.05)
            assert pool.statistics().in_flight == 1  # the others still ride
            for task in tasks[1:]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(100):  # a few turns of the loop, far less than the 5 s the answer takes
                if not pool.statistics().in_flight:
                    break
                await asyncio.sleep(0)
            assert pool.statistics().in_flight == 0  # the combined request is cancelled: nobody waits for it
            stats = pool.statistics()
    assert stats.succeeded == stats.failed == 0 and stats.submitted == 4


async def test_closing_the_pool_settles_riders_of_a_request_in_flight_and_of_one_queued() -> None:
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        server.inject("slow:5000")
        pool = scheduler.Pool(client, model=MODEL, limits=FAST, workers=1, coalesce=Coalescing(max_inputs=3))
        with pytest.raises(KeyError):
            async with pool:
                futures = [asyncio.ensure_future(pool.submit({"model": MODEL, "input": f"t{i}"}, raise_errors=False))
                           for i in range(6)]
                while pool.statistics().in_flight == 0:
                    await asyncio.sleep(0.01)
                raise KeyError("the caller fails")
        results = await asyncio.gather(*futures)
    assert [r.error.code if r.error else None for r in results] == [errors.RunStopped.code] * 6
    assert sum("in flight" in r.error.message for r in results if r.error) == 3


async def test_a_stop_fails_riders_of_a_queued_combined_request() -> None:
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        server.inject("server_error:500")
        async with scheduler.Pool(client, model=MODEL, limits=FAST,
                                  backoff=scheduler.Backoff(base_s=0.5, cap_s=0.5)) as pool:
            futures = [asyncio.ensure_future(pool.submit({"model": MODEL, "input": f"t{i}"}, raise_errors=False))
                       for i in range(5)]
            while pool.statistics().retries == 0:
                await asyncio.sleep(0.01)
            pool.stop("enough")
            results = await asyncio.gather(*futures)
    assert all(r.error is not None and r.error.code == errors.RunStopped.code for r in results)


async def test_with_a_cache_repeated_texts_are_sent_once_and_a_second_pass_sends_nothing() -> None:
    texts = ["alpha", "beta", "alpha", "gamma", "beta"]
    async with running(MockConfig(rpm=100_000, tpm=10_000_000)) as (server, client):
        async with scheduler.Pool(client, model=MODEL, limits=FAST, cache=True) as pool:
            first = await pool.embed(texts)
            second = await pool.embed(texts)
            stats = pool.statistics()
        assert embeddings_stats(server)["inputs_per_request"] == {"3": 1}
    assert first == second and all(close(v, t) for v, t in zip(first, texts, strict=True))
    assert stats.cache_hits == 7 and stats.coalesced_jobs == 3


# -- answers the mock never gives --------------------------------------------------------------------------------


@pytest.fixture
async def short_answers() -> AsyncIterator[tuple[str, list[int]]]:
    """A server whose embeddings answers hold one vector fewer than the inputs asked, then a right answer."""
    counts: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        inputs = (await request.json())["input"]
        counts.append(len(inputs))
        given = inputs if len(counts) > 1 else inputs[:-1]
        body = {"object": "list", "model": MODEL, "usage": {"prompt_tokens": 5, "total_tokens": 5},
                "data": [{"object": "embedding", "index": i, "embedding": [float(i)]} for i in range(len(given))]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/embeddings", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", counts
    finally:
        await runner.cleanup()


async def test_an_answer_missing_a_vector_is_retried_not_misassigned(short_answers: tuple[str, list[int]]) -> None:
    base_url, counts = short_answers
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    async with client, scheduler.Pool(client, model=MODEL, limits=FAST,
                                      backoff=scheduler.Backoff(base_s=0.01, cap_s=0.02)) as pool:
        vectors = await pool.embed(["a", "b", "c"])
    assert counts == [3, 3]
    assert vectors == [[0.0], [1.0], [2.0]]


# -- scheduler run -----------------------------------------------------------------------------------------------


def write_embeddings(path: Path, texts: list[str]) -> None:
    with path.open("wb") as file:
        for i, text in enumerate(texts):
            file.write(orjson.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                     "body": {"model": MODEL, "input": text}}) + b"\n")


async def test_a_bulk_run_of_embeddings_lines_is_coalesced_and_each_line_gets_its_vector(tmp_path: Path) -> None:
    texts = [f"line text {i}" for i in range(1_000)]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_embeddings(source, texts)
    async with MockServer(MockConfig(rpm=100_000, tpm=10_000_000)) as mock:
        # One request a second on our side: what is read meanwhile waits in the queue and goes out together.
        done = await run(source, output, "--base-url", mock.base_url, "--rpm", "60")
        sent = mock.stats()["embeddings"]
    assert done.returncode == 0, done.stderr.decode()
    records = read_output(output)
    assert sorted(int(record["custom_id"][1:]) for record in records) == list(range(1_000))
    for record in records:
        assert close(record["response"]["body"]["data"][0]["embedding"], texts[int(record["custom_id"][1:])])
    # ~1,000/2,048 of the requests sent one by one: the first goes before the rest is read, the rest together.
    assert sent["inputs"] == 1_000 and sent["requests"] <= 3, sent
    assert sum(record["scheduler"].get("coalesced", 1) > 1 for record in records) >= 990
    figures = summary(done.stderr)
    assert figures["coalesced_lines"] >= 990 and 1 <= figures["coalesced_requests"] <= sent["requests"]


async def test_a_bad_line_fails_alone_in_a_bulk_run(tmp_path: Path) -> None:
    texts = [f"line text {i}" for i in range(100)]
    texts[70] = "far too long " * 30
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_embeddings(source, texts)
    async with MockServer(MockConfig(rpm=100_000, tpm=10_000_000, embedding_input_limit=50)) as mock:
        done = await run(source, output, "--base-url", mock.base_url)
    assert done.returncode == 1, done.stderr.decode()  # one line failed
    records = {record["custom_id"]: record for record in read_output(output)}
    assert len(records) == 100
    bad = records.pop("e70")
    assert bad["error"]["code"] == errors.RequestRejected.code and "maximum input length" in bad["error"]["message"]
    assert all(close(r["response"]["body"]["data"][0]["embedding"], texts[int(i[1:])]) for i, r in records.items())


async def test_no_coalesce_sends_a_request_per_line(tmp_path: Path) -> None:
    texts = [f"line {i}" for i in range(30)]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_embeddings(source, texts)
    async with MockServer(MockConfig(rpm=100_000, tpm=10_000_000)) as mock:
        done = await run(source, output, "--base-url", mock.base_url, "--no-coalesce")
        sent = mock.stats()["embeddings"]
    assert done.returncode == 0, done.stderr.decode()
    assert sent["inputs_per_request"] == {"1": 30}
    assert all("coalesced" not in record["scheduler"] for record in read_output(output))
