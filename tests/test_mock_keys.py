"""Limits per API key and per model on the mock server, and their flags."""

from __future__ import annotations

import argparse

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from scheduler.mock import KeyLimits, MockConfig, MockServer, add_mock_arguments, config_from_args

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there friend"}]

pytestmark = pytest.mark.anyio


def client(server: MockServer, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=10)


async def test_each_key_has_its_own_buckets_and_others_get_401() -> None:
    config = MockConfig(keys={"key-a": KeyLimits(60, 100_000), "key-b": KeyLimits(120, 200_000)})
    async with MockServer(config) as server, client(server, "key-a") as a, client(server, "key-b") as b:
        raw = await a.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        with pytest.raises(openai.RateLimitError):  # key-a's one-request burst is spent
            await a.chat.completions.create(model="m", messages=USER)
        raw = await b.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]) == (
            "120", "119")
        async with client(server, "key-c") as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="m", messages=USER)
        stats = server.stats()
        assert stats["keys"] == {
            "key-a": {"requests": 2, "ok": 1, "rate_limited": 1, "admitted_tokens": 21},
            "key-b": {"requests": 1, "ok": 1, "rate_limited": 0, "admitted_tokens": 21},
        }
        assert stats["unauthorized"] == 1


async def test_each_listed_model_has_its_own_buckets() -> None:
    config = MockConfig(rpm=600, tpm=1_000_000, model_limits={"gpt-4o": (60, 30_000)})
    async with MockServer(config) as server, client(server, "x") as c:
        raw = await c.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)
        assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-limit-tokens"]) == (
            "60", "30000")
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="gpt-4o", messages=USER)
        assert "for gpt-4o" in str(info.value.body)
        # Models not listed share the default buckets, untouched by gpt-4o's traffic.
        raw = await c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
        assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]) == (
            "600", "599")
        raw = await c.chat.completions.with_raw_response.create(model="mock-model", messages=USER)
        assert raw.headers["x-ratelimit-remaining-requests"] == "598"
        models = server.stats()["models"]
        assert models["gpt-4o"] == {"requests": 2, "ok": 1, "rate_limited": 1, "admitted_tokens": 21}
        assert models["gpt-4o-mini"]["ok"] == 1


async def test_model_limits_under_a_key() -> None:
    config = MockConfig(keys={
        "key-a": KeyLimits(600, 100_000, model_limits={"gpt-4o": (120, 10_000)}),
        "key-b": KeyLimits(600, 100_000),
    })
    async with MockServer(config) as server, client(server, "key-a") as a, client(server, "key-b") as b:
        raw = await a.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        raw = await b.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"


def test_config_checks_and_flags() -> None:
    with pytest.raises(ValueError):
        MockConfig(keys={"k": KeyLimits(0, 10)})
    with pytest.raises(ValueError):
        MockConfig(model_limits={"m": (1,)})
    with pytest.raises(ValueError):
        MockConfig(keys={"k": KeyLimits(1, 1)}, api_key="k")
    parser = argparse.ArgumentParser()
    add_mock_arguments(parser)
    args = parser.parse_args([
        "--rpm", "500", "--tpm", "90000",
        "--key", "key-a=60,1000", "--key", "key-b",
        "--model-limit", "gpt-4o=30,none",
        "--key-model-limit", "key-a:ft:gpt-4o:org=10,500,200",
    ])
    config = config_from_args(args)
    assert config.keys == {
        "key-a": KeyLimits(60, 1000, None, {"ft:gpt-4o:org": (10, 500, 200)}),
        "key-b": KeyLimits(500, 90000),
    }
    assert config.model_limits == {"gpt-4o": (30, None, None)}
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--key-model-limit", "nokey:m=1,1"]))
