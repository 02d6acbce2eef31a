"""Fallback models: tried in order when the model is unavailable (404) or its retries run out."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler.pool import Fallback
from scheduler.testing import FakeClock, FakeTransport, error, ok
from scheduler.transport import Response

pytestmark = pytest.mark.anyio


def make_pool(transport: FakeTransport, clock: FakeClock, **kwargs: Any) -> scheduler.Pool:
    kwargs.setdefault("limits", scheduler.Limits(rpm=6000))
    return scheduler.Pool(transport=transport, clock=clock, model="gpt-4.1", rng=random.Random(1),
                          backoff=scheduler.Backoff(base_s=0.1, cap_s=1.0), **kwargs)


def by_model(answers: Mapping[str, Response]) -> Any:
    return lambda endpoint, body: answers.get(body["model"], ok(f"from {body['model']}"))


def models(transport: FakeTransport) -> list[str]:
    return [body["model"] for _, body in transport.calls]


async def test_a_404_model_not_found_moves_on_to_the_fallback_at_once() -> None:
    clock = FakeClock()
    transport = FakeTransport(by_model({"gpt-4.1": error(404, "model_not_found", "no such model")}), clock=clock)
    with capture_logs() as logs:
        async with clock.autojump(), make_pool(transport, clock, fallbacks=["gpt-4o-mini"]) as pool:
            result = await pool.submit("hi", max_tokens=5)
    assert models(transport) == ["gpt-4.1", "gpt-4o-mini"]
    assert result.ok and result.model == "gpt-4o-mini" and result.text == "from gpt-4o-mini"
    assert result.attempts == 2 and pool.statistics().fallbacks == 1  # attempts count every model's
    assert [(e["model"], e["failed_model"]) for e in logs if e["event"] == "job_fallback"] == [
        ("gpt-4o-mini", "gpt-4.1")]


async def test_a_model_that_keeps_failing_falls_back_after_its_retries() -> None:
    clock = FakeClock()
    transport = FakeTransport(by_model({"gpt-4.1": error(503), "gpt-4.1-mini": error(500)}), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, max_attempts=3,
                                           fallbacks=["gpt-4.1-mini", "gpt-4o-mini"]) as pool:
        result = await pool.submit("hi", max_tokens=5)
    # Every model gets its own max_attempts; the body's other fields stay as they were.
    assert models(transport) == ["gpt-4.1"] * 3 + ["gpt-4.1-mini"] * 3 + ["gpt-4o-mini"]
    assert {body["max_tokens"] for _, body in transport.calls} == {5}
    assert result.model == "gpt-4o-mini" and result.attempts == 7 and pool.statistics().fallbacks == 2


async def test_a_fallback_with_its_own_client_and_limits() -> None:
    clock = FakeClock()
    primary = FakeTransport(lambda e, b: error(404, "model_not_found"), clock=clock)
    other = FakeTransport(lambda e, b: ok("from the other endpoint"), clock=clock)
    fallback = Fallback(model="llama-3-70b", transport=other, limits=scheduler.Limits(rpm=60))
    async with clock.autojump(), make_pool(primary, clock, fallbacks=[fallback]) as pool:
        results = [await pool.submit(f"q{i}", max_tokens=5) for i in range(3)]
    assert models(primary) == ["gpt-4.1"] * 3 and models(other) == ["llama-3-70b"] * 3
    assert [r.text for r in results] == ["from the other endpoint"] * 3
    # The fallback's own 60 RPM bucket paces it, whatever the primary's limits.
    assert other.sent_at == [0.0, 1.0, 2.0]


async def test_when_every_model_fails_the_last_error_is_the_result() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: error(404, "model_not_found", f"no {b['model']}"), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, fallbacks=["a", "b"]) as pool:
        with pytest.raises(scheduler.RequestRejected, match="no b") as caught:
            await pool.submit("hi", max_tokens=5)
    assert models(transport) == ["gpt-4.1", "a", "b"]
    assert caught.value.result is not None and caught.value.result.model == "b"


async def test_a_bad_request_does_not_fall_back() -> None:
    clock = FakeClock()
    transport = FakeTransport(lambda e, b: error(400, "context_length_exceeded", "too long"), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, fallbacks=["gpt-4o-mini"]) as pool:
        result = await pool.submit("hi", max_tokens=5, raise_errors=False)
    assert models(transport) == ["gpt-4.1"] and result.error is not None and result.model == "gpt-4.1"
