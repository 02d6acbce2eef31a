"""The pool through the real openai SDK over real HTTP, to servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import openai
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

import scheduler
from scheduler.mock import MockConfig, MockServer

pytestmark = pytest.mark.anyio

OK_BODY = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


Step = Callable[[web.Request], "web.StreamResponse | None"]


async def _drop(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.close()  # no answer at all: the SDK sees a dropped connection


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, list[str]]]:
    """A server answering, in turn: 429 with headers, 500, a dropped connection, then success."""
    seen: list[str] = []
    steps = [
        lambda: _json(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                      "code": "rate_limit_exceeded"}},
                      {"retry-after-ms": "50", "x-ratelimit-limit-requests": "600",
                       "x-ratelimit-remaining-requests": "0"}),
        lambda: _json(500, {"error": {"message": "boom", "type": "server_error", "code": None}}),
        None,
        lambda: _json(200, OK_BODY, {"x-request-id": "req_final", "x-ratelimit-limit-requests": "600",
                                     "x-ratelimit-remaining-requests": "599"}),
    ]

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        step = steps[min(len(seen) - 1, len(steps) - 1)]
        if step is None:
            await _drop(request)
            return web.Response(status=500)  # never reaches the client
        return step()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


async def test_retries_429_500_and_a_dropped_connection_through_the_real_sdk(
    scripted: tuple[str, list[str]],
) -> None:
    base_url, seen = scripted
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test-integration-key-123", max_retries=5)
    backoff = scheduler.Backoff(base_s=0.01, cap_s=0.05)
    with capture_logs() as logs:
        async with client, scheduler.Pool(client=client, model="gpt-4o-mini", limits=scheduler.Limits(rpm=600),
                                          backoff=backoff) as pool:
            result = await pool.submit("hello", max_tokens=5)
    # Four attempts, each one HTTP request: the SDK's own retries (max_retries=5 above) are turned off.
    assert len(seen) == 4
    assert result.ok and result.attempts == 4 and result.text == "fine"
    assert result.request_id == "req_final" and result.usage == scheduler.Usage(9, 1)
    events = [e["event"] for e in logs]
    assert events.count("job_retrying") == 3 and "dispatch_paused" in events
    assert all("sk-test-integration-key-123" not in str(e) for e in logs)


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as server:
        yield server


async def test_chat_stream_and_embeddings_against_the_mock(mock: MockServer) -> None:
    client = openai.AsyncOpenAI(base_url=mock.base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
    async with client, scheduler.Pool(client=client, model="gpt-4o-mini", limits=None) as pool:
        chat = await pool.submit("Explain token buckets", max_tokens=8)
        stream = pool.stream("Write a haiku", max_tokens=6)
        deltas = [d async for d in stream]
        embedding = await pool.submit({"model": "text-embedding-3-small", "input": ["a", "b"]})
        many = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=4) for i in range(50)))
        stats = pool.statistics()
    assert chat.ok and chat.text and chat.usage is not None and chat.usage.completion_tokens <= 8
    assert "".join(deltas) == stream.result.text if stream.result else False
    assert stream.result is not None and stream.result.usage is not None
    assert embedding.ok and len(embedding.body["data"]) == 2
    assert all(r.ok for r in many)
    # Limits learned from the mock's first answer.
    assert stats.limits == scheduler.Limits(rpm=60_000, tpm=10_000_000)
    assert mock.stats()["rate_limited"] == 0


async def test_a_refused_key_over_http_stops_the_run_and_hides_the_key() -> None:
    secret = "sk-wrong-key-abcdef123456"
    async with MockServer(MockConfig(api_key="sk-right")) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=secret)
        with capture_logs() as logs:
            # One request a second: the 401 is back before a second request may leave.
            async with client, scheduler.Pool(client=client, model="gpt-4o-mini",
                                              limits=scheduler.Limits(rpm=60)) as pool:
                results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5, raise_errors=False)
                                                 for i in range(5)))
        assert server.stats()["unauthorized"] == 1  # stopped at once: nothing more was sent
    assert {r.error.code for r in results if r.error} == {"authentication_failed"}
    assert all(secret not in repr(r) for r in results)
    assert all(secret not in str(e) for e in logs)
