"""Context that fits, wired into the pool and the CLI: ``submit(trim=...)``, ``Pool(context_windows=...)``,
``RequestTooLarge`` before anything is sent, ``result.trimmed``, and ``scheduler run --trim``.

The trimming rules themselves (which messages may go, in which order) are tested in ``tests/test_trim.py``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import orjson
import pytest
from tiktoken_encodings import needs_encoding

from scheduler import ConfigurationError, ContextWindow, MemorySink, Pool, RequestTooLarge, TrimPolicy
from scheduler.mock import MockConfig, MockServer
from scheduler.requests import CHAT
from scheduler.testing import FakeClock, FakeTransport
from scheduler.tokens import TokenEstimator

pytestmark = [pytest.mark.anyio, needs_encoding("o200k_base", "cl100k_base")]

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You are terse."}
LAST = {"role": "user", "content": "Which word was it?"}


def chat(words_each: int = 300, old: int = 4) -> list[dict[str, Any]]:
    """A system prompt, ``old`` alternating turns of about ``words_each`` tokens each, and a short last question
    (" the" is one token in both encodings, and four characters: the CLI's guess before its tokenizer loads)."""
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: " + "the " * words_each}
             for i in range(old)]
    return [SYSTEM, *turns, LAST]


@asynccontextmanager
async def pool_on_mock(**options: Any) -> AsyncIterator[tuple[Pool, MockServer, list[dict[str, Any]]]]:
    """A pool on a running mock through the real SDK, and the bodies its client sends (read off the wire)."""
    sent: list[dict[str, Any]] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(json.loads(request.content))

    async with (
        MockServer(MockConfig()) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="x",
                           http_client=httpx2.AsyncClient(event_hooks={"request": [record]})) as client,
        Pool(client=client, model="mock-model", **options) as pool,
    ):
        yield pool, server, sent


# -- through the SDK over HTTP to the mock -------------------------------------------------------------------


async def test_trimming_drops_the_oldest_turns_and_keeps_the_system_prompt_and_the_last_question() -> None:
    messages = chat()  # about 1,230 tokens
    async with pool_on_mock(context_windows={"mock-model": 1000}) as (pool, _, sent):
        result = await pool.submit(messages, trim=True, max_tokens=100)
        stats = pool.statistics()
    assert result.ok and result.trimmed == 2
    assert sent[0]["messages"] == [SYSTEM, messages[3], messages[4], LAST]
    assert stats.trimmed_jobs == 1


async def test_a_request_over_the_window_fails_at_once_naming_it_and_nothing_is_sent() -> None:
    sink = MemorySink()
    async with pool_on_mock(context_windows={"mock-model": 1000}, sink=sink) as (pool, server, sent):
        with pytest.raises(RequestTooLarge) as info:
            await pool.submit(chat(), max_tokens=100)
        result = await pool.submit(chat(), max_tokens=100, raise_errors=False, custom_id="big")
        assert server.stats()["requests"] == 0
    assert sent == []
    message = str(info.value)
    assert "mock-model's context window of 1,000 tokens" in message
    assert "beside an output cap of 100" in message and "the prompt needs 1,2" in message
    assert "trim=True" in message
    assert result.error is not None and result.error.code == "request_too_large" and result.trimmed == 0
    assert [r.custom_id for r in sink.results] == ["request-0", "big"]


async def test_the_pools_trim_is_the_default_and_submit_may_turn_it_off() -> None:
    async with pool_on_mock(context_windows={"mock-model": ContextWindow(1000)}, trim=True) as (pool, _, sent):
        results = [r async for r in pool.map([chat(), chat(100)], max_tokens=100)]
        refused = await pool.submit(chat(), max_tokens=100, trim=False, raise_errors=False)
    assert sorted(r.trimmed for r in results) == [0, 2]
    assert refused.error is not None and refused.error.code == "request_too_large"
    assert len(sent) == 2


async def test_what_cannot_fit_even_trimmed_fails_saying_what_is_kept() -> None:
    question = [SYSTEM, {"role": "user", "content": "the " * 2000}]
    async with pool_on_mock(context_windows={"mock-model": 1000}) as (pool, _, sent):
        with pytest.raises(RequestTooLarge, match=r"with none to drop.*the last user message"):
            await pool.submit(question, trim=True, max_tokens=100)
    assert sent == []


# -- the pool's parts, with a fake transport -----------------------------------------------------------------


def fake_pool(transport: FakeTransport, **options: Any) -> Pool:
    return Pool(transport=transport, clock=FakeClock(), rng=random.Random(1), model="gpt-4o-mini", **options)


async def test_the_estimate_charged_is_that_of_the_trimmed_body() -> None:
    transport = FakeTransport()
    async with fake_pool(transport, context_windows={"gpt-4o-mini": 1000}) as pool:
        result = await pool.submit(chat(), trim=True, max_tokens=100)
        charged = pool.statistics().charged_tokens
    sent = transport.calls[0][1]
    assert result.trimmed == 2 and len(sent["messages"]) == 4
    assert charged == TokenEstimator().estimate(CHAT, sent) <= 1000


async def test_a_long_prompt_is_trimmed_off_the_event_loop_too() -> None:
    transport = FakeTransport()
    async with fake_pool(transport, context_windows={"gpt-4o-mini": 20_000}) as pool:
        result = await pool.submit(chat(words_each=8000), trim=True, max_tokens=100)  # 128,000 characters
    assert result.trimmed == 2 and [m["content"][:6] for m in transport.calls[0][1]["messages"][1:3]] == [
        "turn 2", "turn 3"]


async def test_an_explicit_input_limit_trims_a_model_without_a_known_window() -> None:
    transport = FakeTransport()
    policy = TrimPolicy(max_input_tokens=700, keep_last=3)
    async with Pool(transport=transport, model="my-own-model") as pool:
        result = await pool.submit(chat(), trim=policy, max_tokens=100)
        unchecked = await pool.submit(chat(words_each=100_000), max_tokens=100)  # no window: sent as it is
    assert result.trimmed == 2 and transport.calls[0][1]["messages"][1:] == chat()[3:]
    assert unchecked.ok and unchecked.trimmed == 0


async def test_the_built_in_table_applies_and_context_windows_override_it() -> None:
    transport = FakeTransport()
    async with fake_pool(transport) as pool:
        with pytest.raises(RequestTooLarge, match="gpt-4o-mini's context window of 128,000 tokens"):
            await pool.submit("hi", max_tokens=200_000)
        assert (await pool.submit(chat(), max_tokens=100)).ok
    async with fake_pool(FakeTransport(), context_windows={"gpt-4o-mini": 500}) as pool:
        with pytest.raises(RequestTooLarge, match="of 500 tokens"):
            await pool.submit(chat(), max_tokens=100)
    assert len(transport.calls) == 1


async def test_embeddings_inputs_are_held_to_their_per_input_limit() -> None:
    transport = FakeTransport()
    async with fake_pool(transport) as pool:
        with pytest.raises(RequestTooLarge, match=r"input 1 needs .* 8,192 tokens per input"):
            await pool.submit({"model": "text-embedding-3-small", "input": ["ok", "the " * 9000]})
    assert transport.calls == []


@pytest.mark.parametrize("trim", ["yes", 1, TrimPolicy])
async def test_a_bad_trim_is_a_configuration_error(trim: Any) -> None:
    with pytest.raises(ConfigurationError, match="trim must be"):
        Pool(transport=FakeTransport(), trim=trim)
    async with fake_pool(FakeTransport()) as pool:
        with pytest.raises(ConfigurationError, match="trim must be"):
            await pool.submit("hi", trim=trim)


# -- scheduler run --trim ---------------------------------------------------------------------------------


def write_lines(path: Path) -> None:
    """Three lines for gpt-4 (8,192 tokens): one that fits once trimmed, one that fits, one that never fits."""
    lines = [
        {"custom_id": "long-chat", "body": {"model": "gpt-4", "max_tokens": 50, "messages": chat(3000)}},
        {"custom_id": "short", "body": {"model": "gpt-4", "max_tokens": 50, "messages": [LAST]}},
        {"custom_id": "one-huge-question", "body": {"model": "gpt-4", "max_tokens": 50,
                                                    "messages": [{"role": "user", "content": "the " * 9000}]}},
    ]
    path.write_bytes(b"".join(orjson.dumps({"method": "POST", "url": CHAT, **line}) + b"\n" for line in lines))


async def run(source: Path, output: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output), "--mock", "-q", *args]
    return await anyio.run_process(command, check=False, cwd=REPO)


async def test_the_cli_trims_with_trim_and_writes_an_error_record_for_a_line_too_large(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_lines(source)
    plain, trimmed = tmp_path / "plain.jsonl", tmp_path / "trimmed.jsonl"
    without, with_trim = await run(source, plain), await run(source, trimmed, "--trim")
    assert (without.returncode, with_trim.returncode) == (1, 1)
    before = {r["custom_id"]: r for r in map(orjson.loads, plain.read_bytes().splitlines())}
    after = {r["custom_id"]: r for r in map(orjson.loads, trimmed.read_bytes().splitlines())}
    assert set(before) == set(after) == {"long-chat", "short", "one-huge-question"}
    refused = before["long-chat"]["error"]
    assert refused["code"] == "request_too_large" and before["long-chat"]["response"] is None
    assert "gpt-4's context window of 8,192 tokens" in refused["message"] and "--trim" in refused["message"]
    assert after["long-chat"]["error"] is None and after["long-chat"]["scheduler"]["trimmed"] == 2
    assert after["long-chat"]["response"]["body"]["usage"]["prompt_tokens"] < 8192
    for records in (before, after):
        assert records["short"]["error"] is None and "trimmed" not in records["short"]["scheduler"]
        assert records["one-huge-question"]["error"]["code"] == "request_too_large"
