"""Faults of the mock server, scripted and at rates: what a client using the openai SDK sees."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import aiohttp
import openai
import pytest
from mock_client import USER, running
from openai.types.chat import ChatCompletion

from scheduler.mock import MockConfig
from scheduler.mock.faults import FaultPlan, parse_faults

pytestmark = pytest.mark.anyio



async def collect(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, str | None]:
    """Stream a chat completion; return (text, finish_reason)."""
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True, **kwargs)
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


# -- pure logic ------------------------------------------------------------------------------------


def test_fault_specs_parse_and_reject_bad_ones() -> None:
    assert [(f.name, f.arg) for f in parse_faults("slow:250+headers_zero")] == [("slow", "250"), ("headers_zero", "")]
    for bad in ("nope", "server_error:404", "slow:abc", "html:1", "invalid_json:yes", "slow:-1"):
        with pytest.raises(ValueError):
            parse_faults(bad)
    plan = FaultPlan({})
    with pytest.raises(ValueError):
        plan.inject(["html", "nope"])
    assert plan.pending() == []  # nothing queued when one spec is bad
    with pytest.raises(ValueError):
        MockConfig(fault_rates={"html": 1.5})
    with pytest.raises(ValueError):
        MockConfig(fault_rates={"nope": 0.5})


def test_rates_draw_at_most_one_outcome_and_skip_stream_faults_for_plain_requests() -> None:
    import random

    plan = FaultPlan({"html": 1.0, "bad_shape": 1.0, "headers_zero": 1.0, "stream_cut": 1.0})
    rng = random.Random(0)
    assert [f.name for f in plan.draw(rng, streamed=False)] == ["html", "headers_zero"]
    assert [f.name for f in plan.draw(rng, streamed=True)] == ["html", "headers_zero"]  # html comes first
    only_stream = FaultPlan({"stream_cut": 1.0})
    assert only_stream.draw(rng, streamed=False) == ()
    assert [f.name for f in only_stream.draw(rng, streamed=True)] == ["stream_cut"]


# -- answers that are not what they should be ------------------------------------------------------


async def test_html_page_with_status_200() -> None:
    async with running() as (server, client):
        server.inject("html")
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("text/html")
        assert "x-ratelimit-limit-requests" not in raw.headers
        # The SDK hands back the page as a string instead of a ChatCompletion.
        page = raw.parse()
        assert isinstance(page, str) and page.startswith("<!DOCTYPE html>")
        assert server.stats()["faults"] == {"html": 1}


async def test_bad_shape_json() -> None:
    async with running() as (server, client):
        server.inject("bad_shape")
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert raw.status_code == 200
        assert raw.http_response.json() == {"status": "ok"}
        with pytest.raises(ValueError):
            ChatCompletion.model_validate(raw.http_response.json())


async def test_stream_cut_raises_connection_error_after_some_deltas() -> None:
    async with running() as (server, client):
        server.inject("stream_cut")
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        seen: list[str] = []
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                assert chunk.choices[0].finish_reason is None
                seen.append(chunk.choices[0].delta.content or "")
        assert "".join(seen) == "Mock reply: hello"
        assert await collect(client) == ("Mock reply: " + " ".join((["hello", "there", "friend"] * 5)[:14]), "stop")


async def test_stream_truncated_ends_without_finish_reason() -> None:
    async with running() as (server, client):
        server.inject("stream_truncated")
        assert await collect(client) == ("Mock reply: hello", None)


@pytest.mark.parametrize("fault", ["stream_error", "stream_error_event"])
async def test_stream_error_event_after_some_deltas(fault: str) -> None:
    async with running() as (server, client):
        server.inject(fault)
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        seen = ""
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                seen += chunk.choices[0].delta.content or ""
        assert seen == "Mock reply: hello"
        assert info.value.message.startswith("The server had an error while processing your request.")
        assert info.value.type == "server_error"


@pytest.mark.parametrize("fault", ["stream_cut", "stream_truncated", "stream_error", "stream_error_event"])
async def test_a_stream_faults_argument_says_after_how_many_deltas_it_strikes(fault: str) -> None:
    async with running() as (server, client):
        server.inject(f"{fault}:0", f"{fault}:1")
        for count in (0, 1):
            stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
            texts: list[str] = []
            with contextlib.suppress(openai.APIError):
                async for chunk in stream:
                    assert chunk.choices[0].finish_reason is None
                    texts += [chunk.choices[0].delta.content or ""]
            assert [t for t in texts if t] == ["Mock", " reply:"][:count]


async def test_stream_error_before_the_first_delta() -> None:
    async with running() as (server, client):
        server.inject("stream_error_first")
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pytest.fail("no chunk comes before the error")


async def test_stream_faults_on_plain_requests_break_the_json_body() -> None:
    async with running() as (server, client):
        server.inject("stream_cut", "stream_truncated", "stream_error")
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(json.JSONDecodeError):
            await client.chat.completions.create(model="m", messages=USER)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert raw.http_response.json()["error"]["type"] == "server_error"


# -- headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "value"), [("headers_zero", "0"), ("headers_garbage", "unknown"),
                                              ("headers_negative", "-1")])
async def test_rate_limit_header_values(fault: str, value: str) -> None:
    async with running() as (server, client):
        server.inject(fault)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        limits = {k: v for k, v in raw.headers.items() if k.startswith("x-ratelimit-")}
        assert len(limits) == 6
        assert set(limits.values()) == {value}
        raw.parse()  # the answer itself is whole
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert raw.headers["x-ratelimit-limit-requests"] == "10000"


async def test_no_rate_limit_headers_once_or_ever() -> None:
    async with running() as (server, client):
        server.inject("headers_none")
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert not [k for k in raw.headers if k.startswith("x-ratelimit-")]
        assert raw.headers["x-request-id"].startswith("req_")
    async with running(MockConfig(rate_limit_headers=False, rpm=60)) as (server, client):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert not [k for k in raw.headers if k.startswith("x-ratelimit-")]
        with pytest.raises(openai.RateLimitError) as info:  # still enforced
            await client.chat.completions.create(model="m", messages=USER)
        assert not [k for k in info.value.response.headers if k.startswith("x-ratelimit-")]


# -- refusals that charge nothing ------------------------------------------------------------------


async def test_retry_after_long() -> None:
    async with running(MockConfig(retry_after_long_s=90)) as (server, client):
        server.inject("retry_after_long", "retry_after_long:600")
        for seconds in (90, 600):
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="m", messages=USER)
            assert info.value.code == "rate_limit_exceeded"
            h = info.value.response.headers
            assert (h["retry-after"], h["retry-after-ms"]) == (str(seconds), str(seconds * 1000))
        stats = server.stats()
        assert (stats["admitted"], stats["rate_limited"]) == (0, 2)


async def test_refusals_at_rates_charge_nothing() -> None:
    async with running(MockConfig(fault_rates={"quota": 1.0})) as (server, client):
        server.inject("retry_after_long+headers_none")
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=USER)
        assert info.value.code == "rate_limit_exceeded"
        assert "x-ratelimit-limit-tokens" not in info.value.response.headers
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=USER)
        assert info.value.code == "insufficient_quota"
        assert server.stats()["admitted"] == 0
    async with running(MockConfig(fault_rates={"flex_unavailable": 1.0})) as (server, client):
        await client.chat.completions.create(model="m", messages=USER)  # only flex requests are refused
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=USER, service_tier="flex")
        assert info.value.code == "resource_unavailable"
        assert server.stats()["faults"] == {"flex_unavailable": 1}


async def test_quota_fault_and_server_error_with_status() -> None:
    async with running() as (server, client):
        server.inject("quota", "server_error:502", "server_error")
        with pytest.raises(openai.RateLimitError) as quota:
            await client.chat.completions.create(model="m", messages=USER)
        assert quota.value.code == "insufficient_quota"
        with pytest.raises(openai.InternalServerError) as bad_gateway:
            await client.chat.completions.create(model="m", messages=USER)
        assert bad_gateway.value.status_code == 502
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=USER)
        await client.chat.completions.create(model="m", messages=USER)
        stats = server.stats()
        assert (stats["quota"], stats["server_errors"], stats["ok"], stats["admitted"]) == (1, 2, 1, 3)


async def test_drop_and_slow() -> None:
    async with running() as (server, client):
        server.inject("drop", "slow:30+headers_none")
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="m", messages=USER)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        assert "x-ratelimit-limit-tokens" not in raw.headers
        assert server.stats()["faults"] == {"drop": 1, "slow": 1, "headers_none": 1}


# -- output caps -----------------------------------------------------------------------------------


async def test_max_output_uses_the_whole_cap() -> None:
    async with running(MockConfig(completion_tokens=4, long_output_tokens=50)) as (server, client):
        server.inject("max_output", "max_output", "max_output", "max_output:30")
        r = await client.chat.completions.create(model="m", messages=USER, max_tokens=12)
        assert (r.choices[0].finish_reason, r.usage and r.usage.completion_tokens) == ("length", 12)
        r = await client.chat.completions.create(model="m", messages=USER, max_completion_tokens=9, n=2)
        assert [c.finish_reason for c in r.choices] == ["length", "length"]
        assert r.usage is not None and r.usage.completion_tokens == 18
        r = await client.chat.completions.create(model="m", messages=USER)  # no cap: the longest output
        assert (r.choices[0].finish_reason, r.usage and r.usage.completion_tokens) == ("length", 50)
        assert len((r.choices[0].message.content or "").split()) == 50
        text, finish = await collect(client)
        assert (len(text.split()), finish) == (30, "length")
        r = await client.chat.completions.create(model="m", messages=USER, max_tokens=12)
        assert (r.choices[0].finish_reason, r.usage and r.usage.completion_tokens) == ("stop", 4)


async def test_every_answer_fills_its_cap_and_uncapped_answers_are_long() -> None:
    async with running(MockConfig(fill_output_cap=True, uncapped_tokens=40)) as (server, client):
        r = await client.chat.completions.create(model="m", messages=USER, max_tokens=100)
        assert (r.choices[0].finish_reason, r.usage and r.usage.completion_tokens) == ("length", 100)
        r = await client.chat.completions.create(model="m", messages=USER)
        assert (r.choices[0].finish_reason, r.usage and r.usage.completion_tokens) == ("stop", 40)
        resp = await client.responses.create(model="m", input="hi", max_output_tokens=20)
        assert resp.status == "incomplete" and resp.usage is not None and resp.usage.output_tokens == 20
        # Charged up front: prompt + the cap, or the uncapped answer.
        assert server.stats()["admitted_tokens"] == (5 + 100) + (5 + 40) + (1 + 20)


# -- rates, order, and the HTTP control endpoint ---------------------------------------------------


async def test_rates_are_seeded_and_reproducible() -> None:
    config = MockConfig(fault_rates={"html": 0.3, "bad_shape": 0.3, "headers_zero": 0.5}, seed=7)

    async def outcomes() -> list[str]:
        seen = []
        async with running(config) as (_, client):
            for _ in range(20):
                raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
                kind = raw.headers["content-type"].split(";")[0]
                body = raw.http_response.text
                seen.append(f"{kind}:{'status' in body}:{raw.headers.get('x-ratelimit-limit-tokens')}")
        return seen

    first = await outcomes()
    assert first == await outcomes()
    assert len(set(first)) >= 3


async def test_a_refused_request_leaves_its_scripted_fault_for_the_next() -> None:
    async with running(MockConfig(rpm=60)) as (server, client):
        await client.chat.completions.create(model="m", messages=USER)
        server.inject("bad_shape")
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m", messages=USER)
        assert server.pending_faults() == ["bad_shape"]
        server.reset()
        assert server.pending_faults() == []


async def test_http_fault_endpoint() -> None:
    async with running() as (server, client), aiohttp.ClientSession() as http:
        root = server.base_url.removesuffix("/v1")
        async with http.post(f"{root}/mock/faults", json=["server_error:503", "slow:1+headers_zero"]) as r:
            assert (r.status, await r.json()) == (200, {"pending": ["server_error:503", "slow:1+headers_zero"]})
        async with http.post(f"{root}/mock/faults", json={"faults": ["html"]}) as r:
            assert r.status == 200
        async with http.post(f"{root}/mock/faults", json=["nope"]) as r:
            assert r.status == 400
            assert "unknown fault 'nope'" in (await r.json())["error"]["message"]
        async with http.get(f"{root}/mock/faults") as r:
            assert (await r.json())["pending"] == ["server_error:503", "slow:1+headers_zero", "html"]
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=USER)
        async with http.delete(f"{root}/mock/faults") as r:
            assert (await r.json())["pending"] == []
        await client.chat.completions.create(model="m", messages=USER)
