"""Tests of the mock OpenAI server: bucket arithmetic, then real HTTP through the openai SDK."""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import struct
import time
from dataclasses import fields

import aiohttp
import openai
import pytest
from mock_client import USER, running

from scheduler.mock import (
    KeyLimits,
    MockConfig,
    MockServer,
    RateLimiter,
    TokenBucket,
    add_mock_arguments,
    config_from_args,
    format_duration,
    serve,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"



# -- pure bucket logic -----------------------------------------------------------------------------


def test_bucket_refills_continuously_and_caps() -> None:
    b = TokenBucket(capacity=10, rate=2, now=0.0)
    assert b.wait_s(10, 0.0) == 0.0
    b.take(10, 0.0)
    assert b.level_at(1.0) == 2.0
    assert b.wait_s(4, 1.0) == 1.0
    assert b.until_full_s(1.0) == 4.0
    assert b.level_at(100.0) == 10.0
    assert math.isinf(b.wait_s(11, 100.0))


def test_rpm_quantized_to_one_request_per_second() -> None:
    lim = RateLimiter(rpm=60, tpm=None, quantum_s=1.0, now=0.0)
    assert lim.admit(0, 0.0) is None
    refusal = lim.admit(0, 0.5)
    assert refusal is not None
    assert refusal.kind == "requests"
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert not refusal.too_large
    assert lim.admit(0, 1.0) is None
    # The reporting bucket (capacity 60) was charged twice and refilled by 1 over the second.
    assert lim.headers(1.0) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
    }


def test_refusal_charges_nothing() -> None:
    lim = RateLimiter(rpm=60, tpm=None, quantum_s=1.0, now=0.0)
    assert lim.admit(0, 0.0) is None
    for t in (0.1, 0.2, 0.3):
        assert lim.admit(0, t) is not None
    assert lim.admit(0, 1.0) is None


def test_tpm_enforcing_bucket_and_headers() -> None:
    # 600 TPM with a 1 s quantum: bursts of 10 tokens, refilling 10 tokens/s.
    lim = RateLimiter(rpm=None, tpm=600, quantum_s=1.0, now=0.0)
    assert lim.admit(6, 0.0) is None
    assert lim.headers(0.0) == {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "594",
        "x-ratelimit-reset-tokens": "600ms",
    }
    refusal = lim.admit(6, 0.1)  # 5 tokens available, 6 needed: 0.1 s more
    assert refusal is not None
    assert (refusal.kind, refusal.limit, refusal.requested) == ("tokens", 600, 6)
    assert refusal.retry_after_s == pytest.approx(0.1)
    assert lim.admit(6, 0.2) is None


def test_request_larger_than_the_burst_is_too_large() -> None:
    lim = RateLimiter(rpm=None, tpm=600, quantum_s=1.0, now=0.0)
    refusal = lim.admit(11, 0.0)
    assert refusal is not None
    assert refusal.too_large
    assert math.isinf(refusal.retry_after_s)
    # A 60 s quantum disables quantization: the burst is the whole minute's limit.
    assert RateLimiter(rpm=None, tpm=600, quantum_s=60.0, now=0.0).admit(600, 0.0) is None


def test_both_limits_must_have_room_and_longest_wait_is_reported() -> None:
    lim = RateLimiter(rpm=120, tpm=600, quantum_s=1.0, now=0.0)  # bursts: 2 requests, 10 tokens
    assert lim.admit(9, 0.0) is None
    refusal = lim.admit(5, 0.0)  # requests fit (1 left); tokens need 4 more: 0.4 s
    assert refusal is not None
    assert refusal.kind == "tokens"
    assert refusal.retry_after_s == pytest.approx(0.4)
    assert lim.admit(1, 0.0) is None  # refused request took nothing: the second request slot is free
    refusal = lim.admit(1, 0.0)
    assert refusal is not None
    assert refusal.kind == "requests"
    assert refusal.retry_after_s == pytest.approx(0.5)


def test_small_rpm_still_allows_one_request() -> None:
    lim = RateLimiter(rpm=30, tpm=None, quantum_s=1.0, now=0.0)
    assert lim.admit(0, 0.0) is None
    refusal = lim.admit(0, 0.0)
    assert refusal is not None
    assert refusal.retry_after_s == pytest.approx(2.0)
    assert lim.admit(0, 2.0) is None


def test_format_duration() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.006) == "6ms"
    assert format_duration(0.1204) == "121ms"
    assert format_duration(1.2) == "1.2s"
    assert format_duration(20) == "20s"
    assert format_duration(90) == "1m30s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723.5) == "1h2m3.5s"


def test_arguments_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_mock_arguments(parser)
    assert config_from_args(parser.parse_args([])) == MockConfig()
    args = parser.parse_args(
        ["--rpm", "none", "--tpm", "5000", "--quantum", "0.5", "--latency-ms", "20", "--quota-after", "3"]
    )
    config = config_from_args(args)
    assert (config.rpm, config.tpm, config.quantum_s, config.latency_ms) == (None, 5000, 0.5, 20.0)
    assert config.quota_after == 3
    with pytest.raises(ValueError):
        MockConfig(error_rate=1.5)


def test_every_config_field_has_a_flag() -> None:
    """Benchmarks run the mock in its own process: every MockConfig field must be reachable from the CLI."""
    parser = argparse.ArgumentParser()
    add_mock_arguments(parser)
    argv = [
        "--rpm", "100", "--tpm", "1000", "--otpm", "50", "--quantum", "2", "--latency-ms", "1",
        "--latency-sigma", "0.5", "--seed", "9", "--error-rate", "0.1", "--drop-rate", "0.2", "--slow-rate", "0.3",
        "--slow-ms", "7", "--quota-after", "5", "--key", "k1=10,20", "--completion-tokens", "3",
        "--chars-per-token", "3.5", "--fault", "html=0.25", "--fault", "stream_cut=0.5", "--retry-after-long", "9",
        "--no-rate-limit-headers", "--fill-output-cap", "--uncapped-tokens", "99", "--long-output-tokens", "77",
        "--model-limit", "gpt-4o=1,2,3", "--dialect", "anthropic", "--azure-window", "1",
        "--anthropic-output-at-end", "--litellm-window", "30", "--litellm-cooldown", "4", "--capacity", "8",
        "--max-queue", "16", "--overload-status", "429", "--flex-capacity", "0.5", "--flex-latency-ms", "11",
        "--context-window", "gpt-4o=1000", "--context-window", "mock-model=none", "--embedding-max-inputs", "10",
        "--embedding-input-limit", "100", "--embedding-request-limit", "500", "--batch-step-s", "0.5",
    ]
    config = config_from_args(parser.parse_args(argv))
    default = MockConfig()
    unchanged = [f.name for f in fields(MockConfig) if getattr(config, f.name) == getattr(default, f.name)]
    assert unchanged == ["api_key"]  # exclusive with --key; checked below
    assert config_from_args(parser.parse_args(["--api-key", "sk-1"])).api_key == "sk-1"
    assert config.keys == {"k1": KeyLimits(10, 20)}
    assert config.fault_rates == {"html": 0.25, "stream_cut": 0.5}
    assert config.context_windows == {"gpt-4o": 1000, "gpt-4o-mini": 128_000, "gpt-4.1-mini": 1_047_576}
    assert (config.dialect, config.anthropic_output_reserve, config.rate_limit_headers) == ("anthropic", False, False)
    for bad in (["--fault", "nope=1"], ["--fault", "html"], ["--key", "=1,2"], ["--model-limit", "m=1"],
                ["--dialect", "google"], ["--rpm", "lots"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# -- through HTTP with the openai SDK --------------------------------------------------------------


@pytest.mark.anyio
async def test_chat_completion() -> None:
    async with running(MockConfig()) as (server, client):
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
        assert raw.headers["x-request-id"].startswith("req_")
        assert raw.headers["x-ratelimit-limit-requests"] == "10000"
        assert raw.headers["x-ratelimit-remaining-requests"] == "9999"
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(2_000_000 - 5 - 16)
        r = raw.parse()
        assert r.id.startswith("chatcmpl-")
        assert r.model == "gpt-4o-mini"
        # 16 words: "Mock reply:" and the prompt's words, cycled.
        expected = "Mock reply: " + " ".join((["hello", "there", "friend"] * 5)[:14])
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop"
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 16, 21)

        r = await client.chat.completions.create(model="m", messages=USER, max_completion_tokens=3, n=2)
        assert [c.message.content for c in r.choices] == ["Mock reply: hello"] * 2
        assert [c.finish_reason for c in r.choices] == ["length", "length"]
        assert r.usage is not None
        assert r.usage.completion_tokens == 6
        # Charged: 5 prompt + 16 + 3 * 2 capped completion tokens.
        assert server.stats()["admitted_tokens"] == 21 + 11


@pytest.mark.anyio
async def test_streamed_completion_with_usage() -> None:
    async with running(MockConfig(completion_tokens=5)) as (_, client):
        stream = await client.chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == "Mock reply: hello there friend"
        assert finish == "stop"
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (5, 5)


@pytest.mark.anyio
async def test_embeddings_models_and_responses() -> None:
    async with running(MockConfig()) as (_, client):
        e = await client.embeddings.create(model="text-embedding-3-small", input=["abcd", "efgh", "abcd"])
        assert [d.index for d in e.data] == [0, 1, 2]
        assert len(e.data[0].embedding) == 8
        assert e.data[0].embedding == e.data[2].embedding != e.data[1].embedding
        assert e.usage.prompt_tokens == 3
        assert sum(v * v for v in e.data[0].embedding) == pytest.approx(1.0)

        e64 = await client.embeddings.create(model="m", input="abcd", encoding_format="base64")
        raw = e64.data[0].embedding
        floats = struct.unpack("<8f", base64.b64decode(raw)) if isinstance(raw, str) else raw
        assert list(floats) == pytest.approx(e.data[0].embedding, abs=1e-6)

        models = await client.models.list()
        assert "gpt-4o-mini" in [m.id for m in models.data]

        resp = await client.responses.create(model="m", input="say something", max_output_tokens=4)
        assert resp.output_text == "Mock reply: say something"
        assert resp.usage is not None
        assert (resp.usage.input_tokens, resp.usage.output_tokens) == (4, 4)
        resp = await client.responses.create(model="m", input=[{"role": "user", "content": "hi"}])
        assert resp.output_text.startswith("Mock reply: hi hi")


@pytest.mark.anyio
async def test_rate_limited_429() -> None:
    async with running(MockConfig(rpm=60, quantum_s=1.0)) as (server, client):
        results = await asyncio.gather(
            client.chat.completions.create(model="gpt-4o", messages=USER),
            client.chat.completions.create(model="gpt-4o", messages=USER),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        err = errors[0]
        assert isinstance(err, openai.RateLimitError)
        assert err.code == "rate_limit_exceeded"
        assert err.type == "requests"
        assert err.response.json()["error"]["message"].startswith(
            "Rate limit reached for gpt-4o in organization org-mock "
            "on requests per min (RPM): Limit 60, Used 1, Requested 1. Please try again in "
        )
        h = err.response.headers
        assert 500 < int(h["retry-after-ms"]) <= 1000
        assert h["retry-after"] == "1"
        assert h["x-ratelimit-remaining-requests"] == "59"
        assert h["x-request-id"].startswith("req_")
        stats = server.stats()
        assert (stats["ok"], stats["rate_limited"], stats["admitted"]) == (1, 1, 1)
        assert sum(s["rate_limited"] for s in stats["timeline"]) == 1


@pytest.mark.anyio
async def test_too_large_request() -> None:
    async with running(MockConfig(tpm=600)) as (_, client):
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=USER, max_tokens=100)
        assert info.value.code == "rate_limit_exceeded"
        assert "Request too large" in info.value.message
        assert "retry-after-ms" not in info.value.response.headers


@pytest.mark.anyio
async def test_insufficient_quota() -> None:
    async with running(MockConfig(quota_after=2)) as (server, client):
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=USER)
        assert info.value.code == "insufficient_quota"
        assert info.value.type == "insufficient_quota"
        assert server.stats()["quota"] == 1
        server.reset()
        await client.chat.completions.create(model="m", messages=USER)


@pytest.mark.anyio
async def test_wrong_api_key_401() -> None:
    key = "sk-wrong-key-1234"
    async with running(MockConfig(api_key="sk-right"), api_key=key) as (server, client):
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="m", messages=USER)
        assert info.value.code == "invalid_api_key"
        assert info.value.response.json()["error"]["message"].startswith("Incorrect API key provided.")
        assert key not in info.value.response.text
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-right", max_retries=0) as good:
            await good.chat.completions.create(model="m", messages=USER)
        assert (server.stats()["unauthorized"], server.stats()["ok"]) == (1, 1)


@pytest.mark.anyio
async def test_error_rate_gives_5xx() -> None:
    async with running(MockConfig(error_rate=1.0)) as (server, client):
        statuses = set()
        for _ in range(8):
            with pytest.raises(openai.InternalServerError) as info:
                await client.chat.completions.create(model="m", messages=USER)
            statuses.add(info.value.status_code)
            assert info.value.type == "server_error"
        assert statuses <= {500, 502, 503}
        assert len(statuses) > 1
        assert server.stats()["server_errors"] == 8


@pytest.mark.anyio
async def test_drop_rate_closes_connection() -> None:
    async with running(MockConfig(drop_rate=1.0)) as (server, client):
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=USER)
        assert server.stats()["dropped"] == 1


@pytest.mark.anyio
async def test_latency() -> None:
    async with running(MockConfig(latency_ms=100)) as (_, client):
        start = time.perf_counter()
        await client.chat.completions.create(model="m", messages=USER)
        assert time.perf_counter() - start >= 0.1


@pytest.mark.anyio
async def test_bad_requests_stats_and_reset() -> None:
    async with MockServer(MockConfig()) as server, aiohttp.ClientSession() as http:
        url = server.base_url
        for body in (b"{not json", b'{"messages": []}', b'{"model": "m"}'):
            async with http.post(f"{url}/chat/completions", data=body) as r:
                assert r.status == 400
                err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error"
                assert set(err) == {"message", "type", "param", "code"}
                assert "x-ratelimit-limit-tokens" in r.headers
        async with http.post(f"{url}/chat/completions", json={"model": "m"}) as r:
            assert (await r.json())["error"]["param"] == "messages"
        async with http.get(f"{url}/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["message"] == "Invalid URL (GET /v1/nothing)"
        async with http.post(f"{url}/chat/completions", json={"model": "m", "messages": USER}) as r:
            assert r.status == 200
        root = url.removesuffix("/v1")
        async with http.get(f"{root}/stats") as r:
            stats = await r.json()
        assert stats["requests"] == 6
        assert stats["bad_requests"] == 5
        assert stats["ok"] == 1
        assert (stats["prompt_tokens"], stats["completion_tokens"], stats["admitted_tokens"]) == (5, 16, 21)
        assert stats["timeline"][-1] == {
            "t": len(stats["timeline"]) - 1,
            "requests": 1,
            "tokens": 21,
            "rate_limited": 0,
        }
        async with http.post(f"{root}/stats/reset") as r:
            assert r.status == 200
        assert server.stats()["requests"] == 0
        assert server.stats()["timeline"] == []


@pytest.mark.anyio
async def test_serve_prints_base_url(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(serve(MockConfig(), port=0))
    err = ""
    for _ in range(100):
        await asyncio.sleep(0.02)
        err += capsys.readouterr().err
        if "http://" in err or task.done():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert err.startswith("mock OpenAI server listening on http://127.0.0.1:")
    assert err.rstrip().endswith("/v1")
    assert err.count("\n") == 1
