"""Provider dialects of the mock: windows at explicit times, then headers and 429s through the openai SDK."""

from __future__ import annotations

import asyncio
import math
from datetime import datetime
from email.utils import formatdate, parsedate_to_datetime

import openai
import pytest
from mock_client import USER, running

from scheduler.mock import MockConfig, MockServer
from scheduler.mock.dialects import AnthropicDialect, AzureDialect, LiteLLMDialect
from scheduler.mock.parse import parse_chat
from scheduler.mock.ratelimit import FixedWindow

T0 = 1_800_000_000.0  # a calendar-minute boundary (and a multiple of 10 s)

pytestmark = pytest.mark.anyio


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now



def said(err: openai.APIStatusError) -> str:
    """The message in the error body (the SDK's `message` starts with "Error code: ...")."""
    assert isinstance(err.body, dict)
    return str(err.body["message"])


def job(max_tokens: int | None = None, completion: int = 16) -> object:
    body: dict[str, object] = {"model": "m", "messages": USER}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    j = parse_chat(body, MockConfig(completion_tokens=completion))
    return j


# -- pure window and bucket logic ------------------------------------------------------------------


def test_fixed_window_resets_at_the_boundary() -> None:
    w = FixedWindow(limit=3, window_s=60.0)
    for _ in range(3):
        assert w.wait_s(1, T0 + 30) == 0.0
        w.take(1, T0 + 30)
    assert w.wait_s(1, T0 + 45) == 15.0
    assert w.remaining(T0 + 59.9) == 0
    assert w.wait_s(1, T0 + 60) == 0.0  # a new minute: the count starts again
    assert w.remaining(T0 + 60) == 3
    assert math.isinf(w.wait_s(4, T0 + 60))
    assert w.reset_s(T0 + 61) == 59.0


def test_azure_counts_requests_per_ten_seconds() -> None:
    scope = AzureDialect(MockConfig(dialect="azure")).scope(120, None, None, T0)
    j = job()
    for _ in range(20):  # 120 RPM = 20 per 10 s window, all at once
        assert scope.check_in(j, T0 + 1) is None  # type: ignore[arg-type]
    refusal = scope.check_in(j, T0 + 4)  # type: ignore[arg-type]
    assert refusal is not None
    assert (refusal.kind, refusal.limit, refusal.retry_after_s) == ("requests", 20, 6.0)
    assert scope.check_in(j, T0 + 10) is None  # type: ignore[arg-type]
    headers: dict[str, str] = {}
    scope.write_headers(T0 + 12, headers)
    assert headers == {
        "x-ratelimit-limit-requests": "20",
        "x-ratelimit-remaining-requests": "19",
        "x-ratelimit-reset-requests": "8",
    }


def test_anthropic_reserves_max_tokens_and_settles_to_real_output() -> None:
    cfg = MockConfig(dialect="anthropic", quantum_s=60.0)
    scope = AnthropicDialect(cfg).scope(None, None, 1_000, T0)
    big = job(max_tokens=600)
    assert scope.check_in(big, T0) is None  # type: ignore[arg-type]
    refusal = scope.check_in(job(max_tokens=401), T0)  # type: ignore[arg-type]
    assert refusal is not None and refusal.kind == "output_tokens"
    scope.settle(big, T0)  # type: ignore[arg-type]  # 16 tokens written: 584 come back
    assert scope.check_in(job(max_tokens=984), T0) is None  # type: ignore[arg-type]
    headers: dict[str, str] = {}
    scope.write_headers(T0, headers)
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "1000"
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "0"
    # Refills at 1,000/60 per second: full again in 59.04 s, reported to the second.
    reset = datetime.fromisoformat(headers["anthropic-ratelimit-output-tokens-reset"].replace("Z", "+00:00"))
    assert reset.timestamp() == T0 + 60

    at_end = AnthropicDialect(MockConfig(dialect="anthropic", quantum_s=60.0, anthropic_output_reserve=False))
    scope = at_end.scope(None, None, 1_000, T0)
    huge = job(max_tokens=5_000)
    assert scope.check_in(huge, T0) is None  # type: ignore[arg-type]  # nothing reserved up front
    scope.settle(huge, T0)  # type: ignore[arg-type]


def test_litellm_counts_real_usage_per_calendar_minute() -> None:
    cfg = MockConfig(dialect="litellm")
    scope = LiteLLMDialect(cfg).scope(None, 100, None, T0)
    capped = job(max_tokens=50)  # 5 prompt + 16 written: 21, whatever the cap
    for _ in range(4):
        assert scope.check_in(capped, T0 + 10) is None  # type: ignore[arg-type]
        scope.settle(capped, T0 + 10)  # type: ignore[arg-type]
    assert scope.check_in(capped, T0 + 20) is None  # type: ignore[arg-type]  # 84 used + 5 prompt <= 100
    scope.settle(capped, T0 + 20)  # type: ignore[arg-type]
    refusal = scope.check_in(capped, T0 + 30)  # type: ignore[arg-type]
    assert refusal is not None
    assert (refusal.kind, refusal.limit, refusal.used, refusal.retry_after_s) == ("tokens", 100, 105, 30.0)
    assert scope.check_in(capped, T0 + 60) is None  # type: ignore[arg-type]


# -- through HTTP ----------------------------------------------------------------------------------


async def test_azure_headers_and_429() -> None:
    clock = Clock(T0)
    config = MockConfig(dialect="azure", rpm=120, tpm=1_000)
    async with running(config, clock=clock) as (_, client):
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER, max_tokens=100)
        h = raw.headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("20", "19")
        assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("1000", "895")
        assert (h["x-ratelimit-reset-requests"], h["x-ratelimit-reset-tokens"]) == ("10", "60")
        assert h["apim-request-id"] and parsedate_to_datetime(h["date"]).timestamp() == T0
        raw.parse()
        for _ in range(19):
            await client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1)
        clock.now = T0 + 3.5
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=1)
        err = info.value
        assert err.code == "429"
        assert said(err).startswith(
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
            "exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 7 seconds."
        )
        h = err.response.headers
        assert (h["retry-after"], h["retry-after-ms"], h["x-ms-retry-after-ms"]) == ("7", "6500", "6500")
        assert h["x-ratelimit-remaining-requests"] == "0"
        clock.now = T0 + 10
        with pytest.raises(openai.RateLimitError) as info:  # the token minute is what is short now
            await client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=900)
        assert "exceeded token rate limit" in said(info.value)
        assert info.value.response.headers["retry-after"] == "50"


async def test_azure_client_on_deployment_paths() -> None:
    async with MockServer(MockConfig(dialect="azure", api_key="azure-key")) as server:
        root = server.base_url.removesuffix("/v1")
        async with openai.AsyncAzureOpenAI(
            azure_endpoint=root, api_key="azure-key", api_version="2024-06-01", azure_deployment="gpt-4o",
            max_retries=0,
        ) as azure:
            r = await azure.chat.completions.create(model="gpt-4o", messages=USER)
            assert r.model == "gpt-4o"
            e = await azure.embeddings.create(model="text-embedding-3-small", input="abcd")
            assert len(e.data) == 1


async def test_anthropic_headers_and_429() -> None:
    clock = Clock(T0)
    config = MockConfig(dialect="anthropic", rpm=50, tpm=40_000, otpm=8_000)
    async with running(config, clock=clock) as (_, client):
        raw = await client.chat.completions.with_raw_response.create(model="claude", messages=USER, max_tokens=100)
        h = raw.headers
        assert not [k for k in h if k.startswith("x-ratelimit-")]
        for name, limit in (("requests", "50"), ("input-tokens", "40000"), ("output-tokens", "8000"),
                            ("tokens", "48000")):
            assert h[f"anthropic-ratelimit-{name}-limit"] == limit
            reset = datetime.fromisoformat(h[f"anthropic-ratelimit-{name}-reset"].replace("Z", "+00:00"))
            assert T0 <= reset.timestamp() <= T0 + 60
        assert h["anthropic-ratelimit-requests-remaining"] == "49"
        assert h["anthropic-ratelimit-input-tokens-remaining"] == "40000"  # rounded to the thousand
        assert h["request-id"].startswith("req_")
        raw.parse()
        with pytest.raises(openai.RateLimitError) as info:  # 50 RPM quantized: one request a second (1.2 s)
            await client.chat.completions.create(model="claude", messages=USER, max_tokens=100)
        err = info.value
        body = err.response.json()
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        assert body["request_id"] == err.response.headers["request-id"]
        assert err.type == "rate_limit_error"
        assert said(err).startswith("This request would exceed your organization's rate limit of 50 requests per")
        assert err.response.headers["retry-after"] == "2"
        clock.now = T0 + 1.2
        await client.chat.completions.create(model="claude", messages=USER, max_tokens=100)


async def test_anthropic_output_tokens_limit_through_http() -> None:
    config = MockConfig(dialect="anthropic", rpm=None, tpm=None, otpm=1_000, quantum_s=60.0)
    async with running(config, clock=Clock(T0)) as (_, client):
        await client.chat.completions.create(model="claude", messages=USER, max_tokens=600)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="claude", messages=USER, max_tokens=985)
        assert "rate limit of 1,000 output tokens per minute" in said(info.value)
        await client.chat.completions.create(model="claude", messages=USER, max_tokens=984)


async def test_litellm_window_headers_and_429s() -> None:
    clock = Clock(T0 + 30)
    async with running(MockConfig(dialect="litellm", rpm=3, tpm=1_000), clock=clock) as (_, client):
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER, max_tokens=50)
        h = raw.headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("3", "2")
        assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("1000", "1000")
        assert not [k for k in h if k.startswith("x-ratelimit-reset")]
        assert h["date"] == formatdate(T0 + 30, usegmt=True)
        raw.parse()
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER, max_tokens=50)
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 21)  # real usage, not 5 + 50
        clock.now = T0 + 45
        # As LiteLLM 1.108.7 does: the count + 1 reaching the RPM refuses (2 of 3 a minute pass).
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=USER)
        err = info.value
        assert said(err).startswith("litellm.RateLimitError: No deployments available for selected model. "
                                    "Passed model=gpt-4o. Deployments={'mock-deployment': {'current_tpm': 0, "
                                    "'tpm_limit': 0, 'current_rpm': 2, 'rpm_limit': 3}}")
        assert err.code == "429" and err.response.json()["error"]["type"] == "throttling_error"
        h = err.response.headers
        assert "retry-after" not in h and not [k for k in h if k.startswith("x-ratelimit-")]
        assert h["llm_provider-retry-after"] == "60"  # always, whatever is left of the minute
        clock.now = T0 + 60  # the next calendar minute
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER)
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"


async def test_litellm_cooldown_says_no_deployments_available() -> None:
    clock = Clock(T0)
    config = MockConfig(dialect="litellm", rpm=1, tpm=None, litellm_cooldown_s=5, litellm_window_s=1)
    async with running(config, clock=clock) as (_, client):
        await client.chat.completions.create(model="gpt-4o", messages=USER)
        with pytest.raises(openai.RateLimitError) as first:
            await client.chat.completions.create(model="gpt-4o", messages=USER)
        assert said(first.value).startswith("litellm.RateLimitError: No deployments available for selected model.")
        clock.now = T0 + 2  # a new window, but the deployment still cools down
        with pytest.raises(openai.RateLimitError) as cooling:
            await client.chat.completions.create(model="gpt-4o", messages=USER)
        assert said(cooling.value).startswith(
            "No deployments available for selected model, Try again in 3 seconds. Passed model=gpt-4o."
        )
        assert cooling.value.response.json()["error"]["type"] == "None"
        clock.now = T0 + 5
        await client.chat.completions.create(model="gpt-4o", messages=USER)


async def test_none_dialect_capacity_queue_and_overload() -> None:
    config = MockConfig(dialect="none", rpm=1, tpm=1, capacity=1, max_queue=1, latency_ms=50)
    async with running(config) as (server, client):
        results = await asyncio.gather(
            *(client.chat.completions.with_raw_response.create(model="llama", messages=USER) for _ in range(3)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        err = errors[0]
        assert isinstance(err, openai.InternalServerError) and err.status_code == 503
        assert said(err) == "server busy, please try again.  maximum pending requests exceeded"
        for r in results:
            if not isinstance(r, BaseException):
                assert not [k for k in r.headers if "ratelimit" in k]  # and rpm/tpm are not enforced
        stats = server.stats()
        assert stats["capacity"] == {"in_flight": 0, "queued": 0, "max_queued": 1, "overloaded": 1}
    async with running(MockConfig(dialect="none", capacity=1, max_queue=0, latency_ms=50,
                                  overload_status=429)) as (_, client):
        results = await asyncio.gather(
            *(client.chat.completions.create(model="llama", messages=USER) for _ in range(2)), return_exceptions=True
        )
        assert sum(isinstance(r, openai.RateLimitError) for r in results) == 1


async def test_capacity_queues_without_refusing_when_unbounded() -> None:
    async with running(MockConfig(capacity=2, latency_ms=20)) as (server, client):
        await asyncio.gather(*(client.chat.completions.create(model="m", messages=USER) for _ in range(6)))
        stats = server.stats()
        assert stats["ok"] == 6 and stats["capacity"]["max_queued"] >= 1 and stats["capacity"]["overloaded"] == 0
