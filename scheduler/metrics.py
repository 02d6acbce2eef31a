"""Prometheus metrics of a pool, served over HTTP by the pool's own event loop.

``await serve_metrics(pool, 9100)`` serves ``GET /metrics`` on 127.0.0.1 (pass ``host`` to expose it further).
The series live in a registry of their own, not prometheus-client's global one, so two pools never mix. Most
are read from :meth:`Pool.statistics` at scrape time, which costs the pool nothing per request; the latency
histogram and the failure codes are fed by a result observer. No label ever holds a prompt or a custom_id.

==========================================  =======  ==========================================================
series                                      type     meaning
==========================================  =======  ==========================================================
``scheduler_requests_total{outcome}``       counter  ``success`` (answered by the API), ``cached`` (by the
                                                     response cache), ``failed``; ``retry`` (retries scheduled)
                                                     and ``rate_limited`` (429 answers) count attempts
``scheduler_failures_total{code}``          counter  failed jobs by error code (``retries_exhausted``, ...)
``scheduler_attempts_total``                counter  HTTP attempts made
``scheduler_tokens_total{kind}``            counter  ``prompt`` and ``completion`` tokens, from usage
``scheduler_cost_usd_total``                counter  US dollars spent (models with a known price)
``scheduler_truncated_total``               counter  results cut at the output cap (finish_reason "length")
``scheduler_fallbacks_total``               counter  jobs moved on to a fallback model
``scheduler_cache_lookups_total{result}``   counter  response-cache ``hit`` and ``miss``
``scheduler_cache_saved_usd_total``         counter  what the cache hits would have cost
``scheduler_queue_depth``                   gauge    jobs waiting for admission
``scheduler_in_flight``                     gauge    requests on the wire
``scheduler_admitted_requests_per_minute``  gauge    admission rate over the last 10 seconds
``scheduler_admitted_tokens_per_minute``    gauge    tokens charged per minute over the last 10 seconds
``scheduler_limit_requests_per_minute``     gauge    the RPM limit in force (when known)
``scheduler_limit_tokens_per_minute``       gauge    the TPM limit in force (when known)
``scheduler_budget_usd``                    gauge    the spending budget (when set)
``scheduler_budget_reserved_usd``           gauge    worst-case cost held by jobs in flight (when budgeted)
``scheduler_stopped``                       gauge    1 once a run-fatal error or the budget stopped admission
``scheduler_latency_seconds{outcome}``      histo.   seconds from submit to result: ``success``, ``cached``,
                                                     ``failed``
``scheduler_endpoint_requests_total``       counter  attempts sent to each endpoint (label ``endpoint``: its
                                                     name, host and a short key fingerprint; never the key)
``scheduler_endpoint_results_total``        counter  results each endpoint answered, by ``outcome``
                                                     (``success``, ``failed``)
``scheduler_endpoint_failures_total``       counter  5xx, timeouts and dropped connections, by ``endpoint``
``scheduler_endpoint_circuit_open``         gauge    1 while an endpoint's circuit breaker is open or probing
``scheduler_endpoint_retired``              gauge    1 once an endpoint left the run (refused key, spent quota)
==========================================  =======  ==========================================================
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .results import Result
from .statistics import EndpointStatistics

if TYPE_CHECKING:
    from aiohttp import web

    from .pool import Pool

__all__ = ["MetricsServer", "PoolMetrics", "serve_metrics"]

# LLM calls take from a fraction of a second to minutes; the default buckets stop at 10 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class PoolMetrics:
    """A pool's series in a registry of their own (see the module docstring for the names).

    Args:
        pool: the pool to observe; its result observer feeds the histogram and the failure codes.
        registry: where to register (default: a new ``CollectorRegistry``, never the global one).
    """

    __slots__ = ("_answered", "_failures", "_latency", "registry")

    def __init__(self, pool: Pool, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._latency = Histogram(
            "scheduler_latency_seconds", "Seconds from submit to result.", ["outcome"],
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self._failures: dict[str, int] = {}
        self._answered: dict[tuple[str, str], int] = {}
        self.registry.register(_StatisticsCollector(pool, self._failures, self._answered))
        pool.add_observer(self._observe)

    def _observe(self, result: Result) -> None:
        if result.error is not None:
            outcome = "failed"
            self._failures[result.error.code] = self._failures.get(result.error.code, 0) + 1
        else:
            outcome = "cached" if result.cached else "success"
        self._latency.labels(outcome).observe(result.latency_s)
        if result.served_by is not None and not result.cached:
            key = (result.served_by, outcome)
            self._answered[key] = self._answered.get(key, 0) + 1

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format. Call it on the pool's event loop (it reads statistics())."""
        return generate_latest(self.registry)


class _StatisticsCollector(Collector):
    """Reads the pool's counters at scrape time: nothing is done per request for them."""

    def __init__(self, pool: Pool, failures: dict[str, int], answered: dict[tuple[str, str], int]) -> None:
        self._pool = pool
        self._failures = failures
        self._answered = answered

    def collect(self) -> Iterator[Metric]:
        stats = self._pool.statistics()
        requests = CounterMetricFamily("scheduler_requests", "Jobs by outcome, and retries and 429s.",
                                       labels=["outcome"])
        requests.add_metric(["success"], stats.succeeded - stats.cache_hits)
        requests.add_metric(["cached"], stats.cache_hits)
        requests.add_metric(["failed"], stats.failed)
        requests.add_metric(["retry"], stats.retries)
        requests.add_metric(["rate_limited"], stats.rate_limited)
        yield requests
        failures = CounterMetricFamily("scheduler_failures", "Failed jobs by error code.", labels=["code"])
        for code, count in sorted(self._failures.items()):
            failures.add_metric([code], count)
        yield failures
        yield CounterMetricFamily("scheduler_attempts", "HTTP attempts made.", value=stats.attempts)
        tokens = CounterMetricFamily("scheduler_tokens", "Tokens the server reported.", labels=["kind"])
        tokens.add_metric(["prompt"], stats.prompt_tokens)
        tokens.add_metric(["completion"], stats.completion_tokens)
        yield tokens
        yield CounterMetricFamily("scheduler_cost_usd", "US dollars spent.", value=stats.cost_usd)
        yield CounterMetricFamily("scheduler_truncated", "Results cut at the output cap.", value=stats.truncated)
        yield CounterMetricFamily("scheduler_fallbacks", "Jobs moved to a fallback model.", value=stats.fallbacks)
        cache = CounterMetricFamily("scheduler_cache_lookups", "Response-cache lookups.", labels=["result"])
        cache.add_metric(["hit"], stats.cache_hits)
        cache.add_metric(["miss"], stats.cache_misses)
        yield cache
        yield CounterMetricFamily("scheduler_cache_saved_usd", "What the cache hits would have cost.",
                                  value=stats.cache_saved_usd)
        yield GaugeMetricFamily("scheduler_queue_depth", "Jobs waiting for admission.", value=stats.queued)
        yield GaugeMetricFamily("scheduler_in_flight", "Requests on the wire.", value=stats.in_flight)
        yield GaugeMetricFamily("scheduler_admitted_requests_per_minute", "Admissions per minute (last 10 s).",
                                value=stats.requests_per_minute)
        yield GaugeMetricFamily("scheduler_admitted_tokens_per_minute", "Tokens charged per minute (last 10 s).",
                                value=stats.tokens_per_minute)
        limits = stats.limits
        if limits is not None and limits.rpm is not None:
            yield GaugeMetricFamily("scheduler_limit_requests_per_minute", "The RPM limit.", value=limits.rpm)
        if limits is not None and limits.tpm is not None:
            yield GaugeMetricFamily("scheduler_limit_tokens_per_minute", "The TPM limit.", value=limits.tpm)
        if stats.budget_usd is not None:
            yield GaugeMetricFamily("scheduler_budget_usd", "The spending budget.", value=stats.budget_usd)
            yield GaugeMetricFamily("scheduler_budget_reserved_usd", "Worst-case cost held by jobs in flight.",
                                    value=stats.reserved_usd)
        yield GaugeMetricFamily("scheduler_stopped", "1 once admission stopped.",
                                value=1.0 if stats.stopped is not None else 0.0)
        yield from self._endpoints(stats.endpoints)

    def _endpoints(self, endpoints: Sequence[EndpointStatistics]) -> Iterator[Metric]:
        """Series per endpoint, labelled by its name (host and a key fingerprint unless named: never the key)."""
        sent = CounterMetricFamily("scheduler_endpoint_requests", "Attempts sent to each endpoint.",
                                   labels=["endpoint"])
        failures = CounterMetricFamily("scheduler_endpoint_failures",
                                       "5xx answers, timeouts and dropped connections of each endpoint.",
                                       labels=["endpoint"])
        circuit = GaugeMetricFamily("scheduler_endpoint_circuit_open", "1 while the endpoint's circuit is open.",
                                    labels=["endpoint"])
        retired = GaugeMetricFamily("scheduler_endpoint_retired", "1 once the endpoint left the run.",
                                    labels=["endpoint"])
        for e in endpoints:
            sent.add_metric([e.name], e.requests)
            failures.add_metric([e.name], e.failures)
            circuit.add_metric([e.name], 0.0 if e.circuit == "closed" else 1.0)
            retired.add_metric([e.name], 1.0 if e.retired is not None else 0.0)
        results = CounterMetricFamily("scheduler_endpoint_results", "Results each endpoint answered.",
                                      labels=["endpoint", "outcome"])
        for (name, outcome), count in sorted(self._answered.items()):
            results.add_metric([name, outcome], count)
        yield from (sent, results, failures, circuit, retired)


class MetricsServer:
    """Serves a pool's metrics at ``GET /metrics`` from the running event loop (aiohttp).

    The event loop, not a thread: the scrape reads ``pool.statistics()``, which belongs to the loop.
    Use ``await serve_metrics(...)`` (or ``await server.start()``), then ``await server.aclose()`` or
    ``async with``.
    """

    def __init__(self, pool: Pool, port: int, host: str = "127.0.0.1", *, metrics: PoolMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else PoolMetrics(pool)
        self.host = host
        #: the bound port (a free one was picked when 0 was asked for)
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> MetricsServer:
        """Bind and serve."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            self.port = int(sock.getsockname()[1])
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        return self

    async def _scrape(self, request: Any) -> web.Response:
        from aiohttp import web

        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def aclose(self) -> None:
        """Stop serving."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def serve_metrics(pool: Pool, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``pool``'s metrics at ``http://host:port/metrics`` (bound to loopback unless told otherwise);
    returns the running server (``port`` 0 picks a free port: read ``server.port``)."""
    return await MetricsServer(pool, port, host).start()
