"""The mock's Files and Batches APIs, through the real openai SDK over loopback: shapes, life, validation, faults."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import openai
import orjson
import pytest
from openai.types import Batch, CreateEmbeddingResponse, FileDeleted, FileObject
from openai.types.chat import ChatCompletion

from scheduler.mock import MockConfig, MockServer, add_mock_arguments, config_from_args
from scheduler.mock.batch_config import BatchMockConfig

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
FAST = BatchMockConfig(step_s=0.01, lines_per_s=5_000)
TERMINAL = ("completed", "failed", "expired", "cancelled")


@asynccontextmanager
async def running(batch: BatchMockConfig = FAST, **config: Any) -> AsyncIterator[tuple[MockServer, openai.AsyncOpenAI]]:
    async with (
        MockServer(MockConfig(batch=batch, **config)) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=10) as client,
    ):
        yield server, client


def chat_line(custom_id: str, text: str = "hello there", model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body, **extra}


def jsonl(lines: Iterable[dict[str, Any] | bytes]) -> bytes:
    return b"".join(line if isinstance(line, bytes) else orjson.dumps(line) + b"\n" for line in lines)


async def upload(client: openai.AsyncOpenAI, lines: Iterable[dict[str, Any] | bytes]) -> FileObject:
    return await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")


async def submit(
    client: openai.AsyncOpenAI, lines: Iterable[dict[str, Any] | bytes], endpoint: str = CHAT, **kwargs: Any
) -> Batch:
    file = await upload(client, lines)
    return await client.batches.create(
        input_file_id=file.id, endpoint=endpoint, completion_window="24h", **kwargs  # type: ignore[arg-type]
    )


async def wait(client: openai.AsyncOpenAI, batch_id: str, statuses: tuple[str, ...] = TERMINAL) -> list[Batch]:
    """Poll until the batch reaches one of ``statuses``; every Batch seen, the last one reaching it."""
    seen: list[Batch] = []
    for _ in range(1_000):  # bounded: 10 s at most
        batch = await client.batches.retrieve(batch_id)
        seen.append(batch)
        if batch.status in statuses:
            return seen
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch {batch_id} never reached {statuses}: {seen[-1].status}")


async def read(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [orjson.loads(line) for line in content.content.splitlines() if line.strip()]


async def raw_batch(client: openai.AsyncOpenAI, batch_id: str) -> dict[str, Any]:
    response = await client.batches.with_raw_response.retrieve(batch_id)
    body: dict[str, Any] = orjson.loads(response.http_response.content)
    return body


# -- files ----------------------------------------------------------------------------------------


async def test_files_upload_retrieve_list_content_delete() -> None:
    async with running() as (server, client):
        data = jsonl([chat_line("a"), chat_line("b")])
        file = await client.files.create(file=("in.jsonl", data), purpose="batch")
        raw = await client.files.with_raw_response.retrieve(file.id)
        obj = FileObject.model_validate(orjson.loads(raw.http_response.content))
        assert (obj.id, obj.bytes, obj.filename, obj.purpose, obj.status) == (file.id, len(data), "in.jsonl",
                                                                             "batch", "processed")
        assert obj.expires_at == obj.created_at + 30 * 86_400  # batch files expire after 30 days
        assert (await client.files.content(file.id)).content == data
        other = await client.files.create(file=("notes.txt", b"x"), purpose="user_data")
        assert [f.id for f in (await client.files.list(purpose="batch")).data] == [file.id]
        assert [f.id for f in (await client.files.list(order="asc")).data] == [file.id, other.id]
        page = await client.files.list(limit=1)
        assert [f.id for f in page.data] == [other.id] and page.has_more
        deleted = await client.files.with_raw_response.delete(file.id)
        assert FileDeleted.model_validate(orjson.loads(deleted.http_response.content)).deleted
        with pytest.raises(openai.NotFoundError, match="No such File object"):
            await client.files.retrieve(file.id)
        assert server.batches.uploads == 2


async def test_batch_uploads_must_be_jsonl_within_the_size_limit() -> None:
    async with running(BatchMockConfig(max_bytes=100)) as (_, client):
        with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
            await client.files.create(file=("in.txt", b"{}\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="at most 100 bytes"):
            await client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await client.files.create(file=("in.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]


# -- a batch's life ---------------------------------------------------------------------------------


async def test_batch_runs_through_its_states_to_completed_with_sdk_shapes() -> None:
    async with running(BatchMockConfig(step_s=0.05, lines_per_s=100)) as (server, client):
        lines = [chat_line(f"r{i}", f"say {i} please") for i in range(10)]
        batch = await submit(client, lines, metadata={"run": "t1"})
        assert batch.status == "validating" and batch.request_counts is not None
        assert batch.request_counts.total == 0 and batch.metadata == {"run": "t1"}
        seen = await wait(client, batch.id)
        statuses = [b.status for b in seen]
        assert statuses[-1] == "completed"
        assert {"validating", "in_progress", "finalizing"} <= set(statuses)
        assert statuses.index("in_progress") < statuses.index("finalizing")
        body = await raw_batch(client, batch.id)
        final = Batch.model_validate(body)  # strict validation of the mock's JSON against the SDK's type
        assert final.request_counts is not None
        assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (10, 10, 0)
        assert final.model == "gpt-4o-mini" and final.error_file_id is None and final.errors is None
        assert final.in_progress_at is not None and final.finalizing_at is not None and final.completed_at is not None
        assert final.created_at <= final.in_progress_at <= final.finalizing_at <= final.completed_at
        assert final.expires_at == final.created_at + 86_400
        assert final.usage is not None and final.usage.output_tokens == 50  # 5 tokens a reply
        output = await read(client, final.output_file_id)
        assert sorted(line["custom_id"] for line in output) == sorted(f"r{i}" for i in range(10))
        for line in output:
            assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
            assert line["id"].startswith("batch_req_")
            assert set(line["response"]) == {"status_code", "request_id", "body"}
            assert line["response"]["status_code"] == 200
            completion = ChatCompletion.model_validate(line["response"]["body"])
            number = line["custom_id"][1:]
            assert f"say {number} please".split()[0] in (completion.choices[0].message.content or "")
        output_file = await client.files.retrieve(final.output_file_id or "")
        assert output_file.purpose == "batch_output"
        assert server.batches.creates == 1


async def test_embeddings_batch_answered_like_online_embeddings_and_bad_bodies_answered_400() -> None:
    async with running() as (_, client):
        lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "text-embedding-3-small", "input": f"text {i}"}} for i in range(3)]
        lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings",
                      "body": {"model": "text-embedding-3-small"}})
        batch = (await wait(client, (await submit(client, lines, endpoint="/v1/embeddings")).id))[-1]
        assert batch.status == "completed"
        counts = batch.request_counts
        assert counts is not None and (counts.completed, counts.failed) == (3, 1)
        for line in await read(client, batch.output_file_id):
            CreateEmbeddingResponse.model_validate(line["response"]["body"])
        [error] = await read(client, batch.error_file_id)
        assert error["custom_id"] == "bad" and error["error"] is None
        assert error["response"]["status_code"] == 400
        assert error["response"]["body"]["error"]["param"] == "input"


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "code", "line", "param"),
    [
        ([chat_line("a"), chat_line("b", model="gpt-4o")], "model_mismatch", 2, "body.model"),
        ([chat_line("a"), {**chat_line("b"), "url": "/v1/embeddings"}], "url_mismatch", 2, "url"),
        ([chat_line("a"), chat_line("a")], "duplicate_custom_id", 2, "custom_id"),
        ([chat_line("a"), b"{not json\n"], "invalid_json_line", 2, None),
        ([{k: v for k, v in chat_line("a").items() if k != "custom_id"}], "missing_required_parameter", 1,
         "custom_id"),
    ],
)
async def test_invalid_input_files_fail_the_batch_with_errors_data(
    lines: list[Any], code: str, line: int, param: str | None
) -> None:
    async with running() as (_, client):
        batch = (await wait(client, (await submit(client, lines)).id))[-1]
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.errors is not None and batch.errors.data
        error = batch.errors.data[0]
        assert (error.code, error.line, error.param) == (code, line, param)
        assert batch.output_file_id is None and batch.error_file_id is None
        Batch.model_validate(await raw_batch(client, batch.id))


async def test_too_many_requests_and_empty_files_fail() -> None:
    async with running(BatchMockConfig(step_s=0.01, max_requests=2)) as (_, client):
        batch = (await wait(client, (await submit(client, [chat_line(str(i)) for i in range(3)])).id))[-1]
        assert batch.errors is not None and batch.errors.data
        assert batch.status == "failed" and batch.errors.data[0].code == "too_many_tasks"
        batch = (await wait(client, (await submit(client, [b"\n"])).id))[-1]
        assert batch.errors is not None and batch.errors.data
        assert batch.errors.data[0].code == "empty_file"


async def test_create_refuses_bad_arguments_at_once() -> None:
    async with running() as (_, client):
        file = await upload(client, [chat_line("a")])
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            await client.batches.create(input_file_id=file.id, endpoint=CHAT,
                                        completion_window="1h")  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            await client.batches.create(input_file_id=file.id, endpoint="/v1/images/generations",
                                        completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="No such File"):
            await client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="metadata"):
            await client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h",
                                        metadata={str(i): "v" for i in range(17)})
        other = await client.files.create(file=("x.jsonl", b"{}\n"), purpose="user_data")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await client.batches.create(input_file_id=other.id, endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")


# -- faults ---------------------------------------------------------------------------------------


async def test_failed_lines_go_to_the_error_file_with_500_or_an_error_code() -> None:
    async with running(BatchMockConfig(step_s=0.01, lines_per_s=5_000, error_rate=0.5)) as (server, client):
        server.batches.script_line("t", "request_timeout")
        server.batches.script_line("s", 500, 200)
        lines = [chat_line(f"r{i}") for i in range(40)] + [chat_line("t"), chat_line("s")]
        batch = (await wait(client, (await submit(client, lines)).id))[-1]
        errors = await read(client, batch.error_file_id)
        output = await read(client, batch.output_file_id)
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
        assert len(output) + len(errors) == 42 and 5 < len(errors) < 37  # about half of 40, and the two scripted
        by_id = {line["custom_id"]: line for line in errors}
        assert by_id["t"]["response"] is None
        assert by_id["t"]["error"] == {"code": "request_timeout", "message": "The request timed out."}
        assert by_id["s"]["response"]["status_code"] == 500
        assert by_id["s"]["response"]["body"]["error"]["type"] == "server_error"
        for line in errors:
            assert line["response"] is None or line["response"]["status_code"] == 500


async def test_expiry_keeps_what_completed_and_writes_the_rest_as_batch_expired() -> None:
    config = BatchMockConfig(step_s=0.01, lines_per_s=50, window_s=0.2)
    async with running(config) as (_, client):
        batch = (await wait(client, (await submit(client, [chat_line(f"r{i}") for i in range(30)])).id))[-1]
        assert batch.status == "expired" and batch.expired_at is not None and batch.completed_at is None
        output = await read(client, batch.output_file_id)
        errors = await read(client, batch.error_file_id)
        assert 0 < len(output) < 30 and len(output) + len(errors) == 30
        assert {line["custom_id"] for line in output}.isdisjoint(line["custom_id"] for line in errors)
        assert all(line["error"] == {"code": "batch_expired", "message": "This request could not be executed before "
                                     "the completion window expired."} and line["response"] is None
                   for line in errors)
        assert batch.request_counts is not None and batch.request_counts.failed == len(errors)


async def test_scripted_expiry_after_some_lines() -> None:
    async with running() as (server, client):
        server.batches.expire_next(after_lines=4)
        batch = (await wait(client, (await submit(client, [chat_line(f"r{i}") for i in range(10)])).id))[-1]
        assert batch.status == "expired"
        assert [line["custom_id"] for line in await read(client, batch.output_file_id)] == [f"r{i}" for i in range(4)]
        assert len(await read(client, batch.error_file_id)) == 6
        second = (await wait(client, (await submit(client, [chat_line("x")])).id))[-1]
        assert second.status == "completed"  # only the next batch expires


async def test_cancel_keeps_completed_lines_and_refuses_ended_batches() -> None:
    async with running(BatchMockConfig(step_s=0.05, lines_per_s=50)) as (server, client):
        batch = await submit(client, [chat_line(f"r{i}") for i in range(100)])  # 2 s in progress
        await wait(client, batch.id, ("in_progress",))
        await asyncio.sleep(0.1)
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        final = (await wait(client, batch.id))[-1]
        assert final.status == "cancelled" and final.cancelled_at is not None
        output = await read(client, final.output_file_id)
        errors = await read(client, final.error_file_id)
        assert 0 < len(output) < 100 and len(output) + len(errors) == 100
        assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
        with pytest.raises(openai.BadRequestError, match="Cannot cancel"):
            await client.batches.cancel(batch.id)
        assert server.batches.cancels == 1


async def test_enqueued_token_limit_fails_batches_past_it_until_earlier_ones_end() -> None:
    # Each line's prompt is 40 characters: 10 tokens; a file of 10 lines enqueues 100.
    config = BatchMockConfig(step_s=0.01, lines_per_s=20, enqueued_token_limit=150)  # 0.5 s in progress
    async with running(config) as (_, client):
        lines = [chat_line(f"r{i}", "x" * 40) for i in range(10)]
        first = await submit(client, lines)
        await wait(client, first.id, ("in_progress",))
        second = (await wait(client, (await submit(client, lines)).id))[-1]
        assert second.status == "failed" and second.errors is not None and second.errors.data
        error = second.errors.data[0]
        assert error.code == "token_limit_exceeded" and error.line is None
        assert error.message == ("Enqueued token limit reached for gpt-4o-mini in organization org-mock. Limit: 150 "
                                 "enqueued tokens. Please try again once some in_progress batches have been "
                                 "completed.")
        assert (await wait(client, first.id))[-1].status == "completed"
        third = (await wait(client, (await submit(client, lines)).id))[-1]
        assert third.status == "completed"


async def test_refuse_next_scripts_a_token_limit_refusal() -> None:
    async with running() as (server, client):
        server.batches.refuse_next()
        first = (await wait(client, (await submit(client, [chat_line("a")])).id))[-1]
        assert first.errors is not None and first.errors.data
        assert first.status == "failed" and first.errors.data[0].code == "token_limit_exceeded"
        assert (await wait(client, (await submit(client, [chat_line("a")])).id))[-1].status == "completed"


# -- listing, auth, flags -------------------------------------------------------------------------


async def test_batches_list_newest_first_with_cursor_pages() -> None:
    async with running() as (_, client):
        ids = [(await submit(client, [chat_line("a")], metadata={"n": str(i)})).id for i in range(3)]
        page = await client.batches.list(limit=2)
        assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more
        rest = await client.batches.list(limit=2, after=ids[1])
        assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
        assert [b.id async for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK follows the cursor
        with pytest.raises(openai.BadRequestError, match="limit"):
            await client.batches.list(limit=101)


async def test_files_and_batches_need_the_key_when_one_is_set() -> None:
    async with running(api_key="right") as (server, client):
        with pytest.raises(openai.AuthenticationError):
            await upload(client, [chat_line("a")])
        with pytest.raises(openai.AuthenticationError):
            await client.batches.list()
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="right", max_retries=0) as good:
            assert (await upload(good, [chat_line("a")])).purpose == "batch"


def test_batch_flags_build_the_batch_config() -> None:
    parser = argparse.ArgumentParser()
    add_mock_arguments(parser)
    args = parser.parse_args(["--batch-lines-per-s", "10", "--batch-window-s", "5", "--batch-error-rate", "0.1",
                              "--batch-token-limit", "1000", "--batch-step-s", "0.5", "--batch-max-requests", "7"])
    batch = config_from_args(args).batch
    assert (batch.lines_per_s, batch.window_s, batch.error_rate, batch.enqueued_token_limit, batch.step_s,
            batch.max_requests) == (10, 5, 0.1, 1000, 0.5, 7)
    assert config_from_args(parser.parse_args([])).batch == BatchMockConfig()
    with pytest.raises(ValueError, match="error_rate"):
        BatchMockConfig(error_rate=2)
