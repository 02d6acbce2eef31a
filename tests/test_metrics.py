"""The Prometheus endpoint serves the documented series, on loopback, with no custom_id in any label."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import scheduler
from scheduler import metrics
from scheduler.metrics import PoolMetrics, serve_metrics
from scheduler.testing import FakeTransport, error, ok

pytestmark = pytest.mark.anyio

DOCUMENTED = set(re.findall(r"``(scheduler_[a-z_]+)[{`]", metrics.__doc__ or ""))


async def fetch(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


async def test_the_endpoint_serves_the_documented_series() -> None:
    transport = FakeTransport(script=[error(500), ok(finish_reason="length"), error(400, "bad"), ok(), ok()])
    pool = scheduler.Pool(transport=transport, model="gpt-4o-mini", limits=scheduler.Limits(rpm=60_000, tpm=10**6),
                          cache=True, budget_usd=10.0, backoff=scheduler.Backoff(base_s=0.001, cap_s=0.001))
    async with pool, await serve_metrics(pool, 0) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        await pool.submit("a", max_tokens=5, custom_id="secret-custom-id-a")
        await pool.submit("b", max_tokens=5, custom_id="secret-custom-id-b", raise_errors=False)
        await asyncio.gather(*(pool.submit("same", max_tokens=5, temperature=0, custom_id=f"secret-{i}")
                               for i in range(2)))
        content_type, text = await fetch(server.url)
    assert content_type.startswith("text/plain")
    assert "secret" not in text
    families = list(text_string_to_metric_families(text))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }
    # Served and documented are the same set (the parser names a counter family without its _total; the
    # histogram's _created timestamp is prometheus-client's own).
    served = {family.name for family in families if not family.name.endswith("_created")}
    assert served == {name.removesuffix("_total") for name in DOCUMENTED}
    assert len(DOCUMENTED) == 24
    assert samples[("scheduler_requests_total", (("outcome", "success"),))] == 2
    assert samples[("scheduler_requests_total", (("outcome", "cached"),))] == 1
    assert samples[("scheduler_requests_total", (("outcome", "failed"),))] == 1
    assert samples[("scheduler_requests_total", (("outcome", "retry"),))] == 1
    assert samples[("scheduler_failures_total", (("code", "request_rejected"),))] == 1
    assert samples[("scheduler_attempts_total", ())] == 4
    assert samples[("scheduler_tokens_total", (("kind", "prompt"),))] == 20
    assert samples[("scheduler_truncated_total", ())] == 1
    assert samples[("scheduler_cache_lookups_total", (("result", "miss"),))] == 1
    assert samples[("scheduler_latency_seconds_count", (("outcome", "success"),))] == 2
    assert samples[("scheduler_budget_usd", ())] == 10.0
    assert samples[("scheduler_cost_usd_total", ())] > 0
    assert samples[("scheduler_in_flight", ())] == 0 and samples[("scheduler_queue_depth", ())] == 0
    assert samples[("scheduler_limit_requests_per_minute", ())] == 60_000
    # The endpoint's name labels its series (a transport without a client is named "endpoint").
    assert samples[("scheduler_endpoint_requests_total", (("endpoint", "endpoint"),))] == 4
    assert samples[("scheduler_endpoint_failures_total", (("endpoint", "endpoint"),))] == 1
    assert samples[("scheduler_endpoint_results_total", (("endpoint", "endpoint"), ("outcome", "success")))] == 2
    assert samples[("scheduler_endpoint_circuit_open", (("endpoint", "endpoint"),))] == 0
    labels = {key for _, pairs in samples for key, _ in pairs}
    assert labels <= {"outcome", "code", "kind", "result", "le", "endpoint"}


async def test_each_pool_has_its_own_registry_not_the_global_one() -> None:
    first = PoolMetrics(scheduler.Pool(transport=FakeTransport(), model="m"))
    second = PoolMetrics(scheduler.Pool(transport=FakeTransport(), model="m"))
    assert first.registry is not second.registry and first.registry is not REGISTRY
    assert REGISTRY.get_sample_value("scheduler_attempts_total") is None
