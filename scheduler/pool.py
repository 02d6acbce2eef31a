"""The pool: a priority queue, one dispatcher that admits jobs through the limiter, and N workers.

::

    submit()/map() ──► JobQueue ──► dispatcher ──(limiter: RPM + TPM)──► worker ──► Transport ──► API
                          ▲                                                │
                          └────── requeue after backoff ◄── classify ◄─────┴──► Sink, caller
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import os
import random
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from . import errors
from .cache import CacheBackend, CachedResponse, MemoryCache, cache_key, is_deterministic, open_cache
from .clock import Clock, LoopClock
from .cost import ModelPrice, PriceTable
from .limits import ClockedLimiter, Limiter, Limits
from .logs import redact, register_secret
from .queue import JobQueue
from .requests import Request, build_body
from .results import ErrorInfo, Result, Usage
from .retry import Backoff, Outcome, classify, error_code, retry_after_s
from .sinks import Sink
from .tokens import TokenEstimator, output_reservation
from .transport import OpenAITransport, Response, Transport, TransportFailure

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["Fallback", "Pool", "PoolStatistics", "PoolStream"]

log = structlog.get_logger("scheduler")

# Prompts longer than this are tokenized in a thread, off the event loop.
_THREAD_ESTIMATE_CHARS = 100_000

_ERROR_CLASSES: dict[str, type[errors.JobError]] = {
    cls.code: cls
    for cls in (
        errors.RequestRejected,
        errors.RequestTooLarge,
        errors.RetriesExhausted,
        errors.DeadlineExceeded,
        errors.RunStopped,
        errors.QuotaExhausted,
        errors.AuthenticationFailed,
        errors.BudgetExhausted,
    )
}


@dataclass(frozen=True, slots=True)
class Fallback:
    """A model to try when the one before it is unavailable (404) or keeps failing (retries exhausted).

    Each fallback has its own rate-limit buckets. ``client`` points it at another endpoint (default: the
    pool's); ``limits`` are its limits (default: learned from its first response's headers).
    """

    model: str
    client: AsyncOpenAI | None = None
    limits: Limits | None = None
    #: a seam for tests, like Pool(transport=...)
    transport: Transport | None = None


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool's counters (see :meth:`Pool.statistics`)."""

    submitted: int
    queued: int
    in_flight: int
    succeeded: int
    failed: int
    #: attempts that will be (or were) made again
    retries: int
    #: 429 rate_limit_exceeded answers
    rate_limited: int
    #: HTTP attempts made, answered or not
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    #: tokens charged against the token limit (our estimates, calibrated)
    charged_tokens: int
    #: admissions over the last 10 seconds, per minute
    requests_per_minute: float
    tokens_per_minute: float
    limits: Limits | None
    #: server tokens per token of our estimate, as learned from the headers
    token_ratio: float
    #: results whose output hit the cap (finish_reason "length")
    truncated: int
    #: US dollars spent, from usage and the price table (models without a price count nothing)
    cost_usd: float
    #: why admission stopped, if it did
    stopped: str | None
    budget_usd: float | None = None
    #: worst-case cost held for jobs in flight, under a budget
    reserved_usd: float = 0.0
    #: answers served from the response cache, or shared with an identical request in flight
    cache_hits: int = 0
    #: cacheable requests that went to the API
    cache_misses: int = 0
    #: what the cache hits would have cost
    cache_saved_usd: float = 0.0
    #: times a job moved on to a fallback model
    fallbacks: int = 0
    #: times a 429 paused all dispatch
    pauses: int = 0


class _Job:
    __slots__ = (
        "attempts",
        "body",
        "cache_key",
        "cancelled",
        "charged",
        "custom_id",
        "deadline",
        "deliver",
        "endpoint",
        "estimate",
        "followers",
        "future",
        "priority",
        "reserved",
        "route",
        "sequence",
        "stream_to",
        "submitted_at",
    )

    def __init__(
        self, endpoint: str, body: Mapping[str, Any], custom_id: str, priority: int, sequence: int,
        estimate: int, submitted_at: float, deadline: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.body = body
        self.custom_id = custom_id
        self.priority = priority
        self.sequence = sequence
        self.estimate = estimate
        self.charged = 0
        self.submitted_at = submitted_at
        self.deadline = deadline
        self.attempts = 0
        self.cancelled = False
        #: the submitter's future (submit, stream)
        self.future: asyncio.Future[Result] | None = None
        #: where map() collects results
        self.deliver: _MapCollector | None = None
        #: text deltas of a streamed job
        self.stream_to: anyio.abc.ObjectSendStream[str] | None = None
        #: 0: the primary model; n: the n-th fallback
        self.route = 0
        #: worst-case cost held against the budget while in flight
        self.reserved = 0.0
        #: response-cache key (cacheable jobs of a pool with a cache)
        self.cache_key: str | None = None
        #: identical jobs waiting for this one's answer (single flight)
        self.followers: list[_Job] | None = None


class _RateMeter:
    """Admissions per second over a sliding window, for the rates in statistics()."""

    __slots__ = ("_seconds", "window")

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._seconds: deque[list[float]] = deque()  # [second, requests, tokens]

    def add(self, now: float, tokens: int) -> None:
        second = math.floor(now)
        if self._seconds and self._seconds[-1][0] == second:
            entry = self._seconds[-1]
            entry[1] += 1
            entry[2] += tokens
        else:
            self._seconds.append([second, 1, tokens])
            while self._seconds[0][0] <= second - self.window:
                self._seconds.popleft()

    def per_minute(self, now: float) -> tuple[float, float]:
        horizon = math.floor(now) - self.window
        recent = [entry for entry in self._seconds if entry[0] > horizon]
        scale = 60.0 / self.window
        return sum(e[1] for e in recent) * scale, sum(e[2] for e in recent) * scale


class Pool:
    """Schedules requests to an OpenAI-compatible API within its rate limits.

    Args:
        client: an ``openai.AsyncOpenAI`` for any OpenAI-compatible endpoint (its own retries are turned off:
            the pool retries). Default: ``AsyncOpenAI()`` configured from the environment.
        model: the model for string prompts and message lists, and for bodies without one.
        limits: the rate limits to stay under; ``None`` learns them from the first response's headers.
        workers: the most requests in flight at once.
        max_attempts: attempts per job, counting the first.
        backoff: the jittered exponential backoff between retries.
        request_timeout_s: timeout of one HTTP attempt.
        queue_size: jobs queued before ``submit`` waits (backpressure).
        sink: receives every result (e.g. :class:`~scheduler.JsonlSink`).
        default_max_tokens: output reservation charged for requests without an output cap.
        redis: a Redis URL: the RPM/TPM buckets live there, shared by every pool that uses the same API key,
            base URL and model (requires ``limits``).
        prices: model prices added to (or replacing) the built-in list prices: a mapping of model name to
            :class:`~scheduler.cost.ModelPrice` or ``{"input", "cached_input", "output"}`` (USD per 1M tokens),
            or the path of a JSON file of them. Costs land in ``Result.cost_usd`` and ``statistics().cost_usd``.
        budget_usd: stop admitting before spending could pass this many US dollars: each job in flight holds
            its worst-case cost (prompt estimate at the input price, output reservation at the output price)
            until its real cost is known; when the next job cannot fit even with nothing in flight, it and every
            later job fail with BudgetExhausted. Every model used must have a price.
        cache: the response cache for deterministic requests: a :class:`~scheduler.cache.CacheBackend`, ``True``
            for an in-memory LRU, or a path (SQLite) or ``redis://`` URL that the pool opens and closes.
        fallbacks: models (or :class:`Fallback` s with their own client and limits) tried in order when a job's
            model is unavailable (404) or its retries run out.
        transport, limiter, clock, rng: seams for tests and for other limiter backends.
    """

    def __init__(
        self,
        client: AsyncOpenAI | None = None,
        *,
        model: str | None = None,
        limits: Limits | None = None,
        workers: int = 64,
        max_attempts: int = 6,
        backoff: Backoff | None = None,
        request_timeout_s: float = 600.0,
        queue_size: int = 1024,
        sink: Sink | None = None,
        default_max_tokens: int = 1024,
        redis: str | None = None,
        prices: str | os.PathLike[str] | Mapping[str, ModelPrice | Mapping[str, float]] | PriceTable | None = None,
        budget_usd: float | None = None,
        cache: CacheBackend | str | os.PathLike[str] | bool | None = None,
        fallbacks: Sequence[str | Fallback] = (),
        transport: Transport | None = None,
        limiter: Limiter | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if workers < 1:
            raise errors.ConfigurationError(f"workers must be at least 1, got {workers}")
        if max_attempts < 1:
            raise errors.ConfigurationError(f"max_attempts must be at least 1, got {max_attempts}")
        if redis is not None and limits is None:
            raise errors.ConfigurationError("shared limits need explicit limits=Limits(rpm=..., tpm=...)")
        if budget_usd is not None and not budget_usd >= 0:
            raise errors.ConfigurationError(f"budget_usd must be a number of dollars >= 0, got {budget_usd!r}")
        if transport is None:
            if client is None:
                from openai import AsyncOpenAI

                client = AsyncOpenAI()
            register_secret(getattr(client, "api_key", None))
            transport = OpenAITransport(client)
        self._client = client
        self.prices = PriceTable.load(prices)
        self._budget = float(budget_usd) if budget_usd is not None else None
        self._fallbacks = tuple(f if isinstance(f, Fallback) else Fallback(model=f) for f in fallbacks)
        if self._budget is not None:
            for name in (model, *(f.model for f in self._fallbacks)):
                if name is not None and self.prices.price(name) is None:
                    raise errors.ConfigurationError(f"a budget needs a price for every model: none for {name!r}")
        self._fallback_transports: list[Transport] = []
        for fallback in self._fallbacks:
            if fallback.client is not None:
                register_secret(getattr(fallback.client, "api_key", None))
            self._fallback_transports.append(
                fallback.transport
                or (OpenAITransport(fallback.client) if fallback.client is not None else transport)
            )
        self._fallback_routes: list[tuple[Transport, Limiter]] = []
        self._cache: CacheBackend | None
        if cache is True:
            self._cache, self._owns_cache = MemoryCache(), True
        elif isinstance(cache, str | os.PathLike):
            self._cache, self._owns_cache = open_cache(cache), True
        else:
            # Not "cache or None": an empty cache may well be falsy (it has a length).
            self._cache, self._owns_cache = (None if cache is None or cache is False else cache), False
        # Answers differ between providers serving the same model name: the base URL is part of the key.
        self._cache_scope = str(getattr(client, "base_url", "") or "")
        self._flights: dict[str, _Job] = {}
        self._cache_failed = False
        self._observers: list[Callable[[Result], None]] = []
        self._redis_url = redis
        self._limit_scope = _limit_scope(client, model)
        self.model = model
        self.workers = workers
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.request_timeout_s = request_timeout_s
        self.sink = sink
        self.estimator = TokenEstimator(default_max_tokens)
        self._transport = transport
        self._clock: Clock = clock or LoopClock()
        self._limits = limits
        self._limiter = limiter
        self._rng = rng or random.Random()
        self._queue: JobQueue[_Job] = JobQueue(queue_size)
        self._sequence = itertools.count()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._job_tasks: set[asyncio.Task[None]] = set()
        #: limiters the pool opened itself (Redis connections), and so closes
        self._owned_limiters: list[Any] = []
        self._job_error: BaseException | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pause_until = -math.inf
        self._stopped: errors.RunStopped | None = None
        self._closing = False
        self._outstanding = 0
        self._idle: asyncio.Event | None = None
        self._meter = _RateMeter()
        # counters behind statistics()
        self._submitted = self._succeeded = self._failed = self._retries = self._rate_limited = 0
        self._attempts = self._in_flight = self._prompt_tokens = self._completion_tokens = 0
        self._charged_tokens = self._truncated = 0
        self._cost_usd = 0.0
        self._reserved_usd = 0.0
        self._reserved_jobs = 0
        self._budget_freed: asyncio.Event | None = None
        self._cache_hits = self._cache_misses = self._fallbacks_used = self._pauses = 0
        self._cache_saved_usd = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pool:
        if self.model is not None:
            # Loading an encoding takes a few hundred milliseconds: not on the event loop, not at the first submit.
            await anyio.to_thread.run_sync(TokenEstimator.preload, self.model)
        if self._limiter is None and self._redis_url is not None:
            from .redis_limiter import RedisLimiter

            assert self._limits is not None
            self._limiter = await RedisLimiter.connect(self._redis_url, self._limits, scope=self._limit_scope)
            self._owned_limiters.append(self._limiter)
        if self._limiter is None:
            self._limiter = ClockedLimiter(self._limits, self._clock)
        self._fallback_routes = []
        for fallback, transport in zip(self._fallbacks, self._fallback_transports, strict=True):
            limiter: Limiter = ClockedLimiter(fallback.limits, self._clock)
            if self._redis_url is not None and fallback.limits is not None:
                from .redis_limiter import RedisLimiter

                scope = _limit_scope(fallback.client or self._client, fallback.model)
                limiter = await RedisLimiter.connect(self._redis_url, fallback.limits, scope=scope)
                self._owned_limiters.append(limiter)
            self._fallback_routes.append((transport, limiter))
        self._budget_freed = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._idle = asyncio.Event()
        self._idle.set()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._dispatch)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        assert self._task_group is not None and self._idle is not None
        try:
            if exc_type is None:
                # Drain: every submitted job finishes (or fails) before the pool closes.
                await self._idle.wait()
        finally:
            self._closing = True
            for task in self._job_tasks:
                task.cancel()
            # Shielded: when leaving because of a cancellation, the job tasks must still be awaited.
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*self._job_tasks, return_exceptions=True)
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(exc_type, exc, tb)
            self._task_group = None
            for owned in self._owned_limiters:
                await owned.aclose()
            self._owned_limiters.clear()
            if self.sink is not None:
                await self.sink.aclose()
            if self._owns_cache and self._cache is not None:
                await self._cache.aclose()
        if self._job_error is not None:
            raise self._job_error
        return None

    # ------------------------------------------------------------------ submitting

    async def submit(
        self,
        request: str | Sequence[Mapping[str, Any]] | Mapping[str, Any],
        *,
        endpoint: str | None = None,
        priority: int = 0,
        custom_id: str | None = None,
        timeout_s: float | None = None,
        raise_errors: bool = True,
        cache: bool | None = None,
        **body: Any,
    ) -> Result:
        """Run one request and return its :class:`Result`.

        Args:
            request: a prompt (one user message), a list of chat messages, or a whole request body.
            endpoint: the API path for a whole body (default: inferred; chat completions for messages).
            priority: lower runs first.
            custom_id: your id for the request (default: a sequence number).
            timeout_s: fail with DeadlineExceeded if not done within this many seconds.
            raise_errors: raise the job's error (default) or return the error Result.
            cache: use the pool's response cache: True always, False never, None (default) when the request is
                deterministic (``temperature=0``, embeddings).
            **body: request body fields, e.g. ``max_tokens=200, temperature=0``.

        Raises:
            JobError: the job failed (a subclass says why); ``exc.result`` is its error Result.
            PoolClosed: the pool is not running.
            ConfigurationError: the request cannot be built.
        """
        endpoint, full_body = self._build_body(request, endpoint, body)
        job = await self._new_job(endpoint, full_body, custom_id, priority, timeout_s, cache)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        job.future = future
        await self._enqueue(job)
        try:
            # Not shielded: cancelling the caller cancels this future, which the pool checks before delivering.
            result = await future
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if raise_errors and result.error is not None:
            raise _ERROR_CLASSES.get(result.error.code, errors.JobError)(result.error.message, result)
        return result

    def stream(
        self,
        request: str | Sequence[Mapping[str, Any]] | Mapping[str, Any],
        *,
        priority: int = 0,
        custom_id: str | None = None,
        timeout_s: float | None = None,
        **body: Any,
    ) -> PoolStream:
        """Stream a chat completion's text deltas; the job is admitted like any other.

        Iterate the returned :class:`PoolStream` for text; afterwards ``.result`` holds usage and the whole
        text. A failure before the first delta is retried; after it, the stream raises the job's error.
        """
        endpoint, full_body = self._build_body(request, None, body)
        if not endpoint.endswith("chat/completions"):
            raise errors.ConfigurationError("stream() supports chat completions")
        options = dict(full_body.get("stream_options") or {})
        options["include_usage"] = True
        full_body = {**full_body, "stream": True, "stream_options": options}
        return PoolStream(self, endpoint, full_body, custom_id, priority, timeout_s)

    def add_observer(self, observer: Callable[[Result], None]) -> None:
        """Call ``observer(result)`` for every result, as it is delivered (metrics use it). It must be quick,
        and what it raises is logged and ignored."""
        self._observers.append(observer)

    async def map(
        self, requests: Iterable[Request | str | Mapping[str, Any]] | AsyncIterable[Request | str | Mapping[str, Any]],
        *, buffer: int = 256,
    ) -> AsyncIterator[Result]:
        """Run many requests and yield their results (errors included) as they complete.

        Memory stays bounded however many requests come in: they are read from ``requests`` only as the queue
        has room, and a consumer that falls ``buffer`` results behind slows the workers down.
        """
        # Fed but not yet read, at most: a slow reader then slows the feed instead of results piling up.
        collector = _MapCollector(self._queue.maxsize + self.workers + buffer)
        failure: list[BaseException] = []

        async def feed(*, task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                try:
                    if isinstance(requests, AsyncIterable):
                        async for item in requests:
                            await self._feed_one(item, collector)
                    else:
                        for item in requests:
                            await self._feed_one(item, collector)
                except Exception as exc:
                    failure.append(exc)
            collector.feeding_done()

        tg = self._running()
        scope = await tg.start(feed)
        try:
            while (result := await collector.next()) is not None:
                yield result
        finally:
            collector.reader_gone()
            scope.cancel()
        if failure:
            raise failure[0]

    async def _feed_one(self, item: Request | str | Mapping[str, Any], collector: _MapCollector) -> None:
        await collector.room.acquire()
        try:
            await self._feed_job(item, collector)
        except BaseException:
            collector.room.release()
            raise

    async def _feed_job(self, item: Request | str | Mapping[str, Any], collector: _MapCollector) -> None:
        if isinstance(item, Request):
            endpoint, body = self._build_body(item.body, item.endpoint, {})
            job = await self._new_job(endpoint, body, item.custom_id, item.priority, item.timeout_s, item.cacheable)
        else:
            endpoint, body = self._build_body(item, None, {})
            job = await self._new_job(endpoint, body, None, 0, None)
        job.deliver = collector
        collector.pending += 1
        try:
            await self._enqueue(job)
        except BaseException:
            collector.pending -= 1
            raise

    def statistics(self) -> PoolStatistics:
        """The pool's counters and current rates."""
        now = self._clock.now()
        rpm, tpm = self._meter.per_minute(now)
        limiter = self._limiter
        ratio = getattr(getattr(limiter, "local", limiter), "ratio", 1.0)
        return PoolStatistics(
            submitted=self._submitted,
            queued=len(self._queue),
            in_flight=self._in_flight,
            succeeded=self._succeeded,
            failed=self._failed,
            retries=self._retries,
            rate_limited=self._rate_limited,
            attempts=self._attempts,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            charged_tokens=self._charged_tokens,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            limits=limiter.snapshot() if limiter is not None else self._limits,
            token_ratio=float(ratio),
            truncated=self._truncated,
            cost_usd=self._cost_usd,
            stopped=str(self._stopped) if self._stopped is not None else None,
            budget_usd=self._budget,
            reserved_usd=self._reserved_usd,
            cache_hits=self._cache_hits,
            cache_misses=self._cache_misses,
            cache_saved_usd=self._cache_saved_usd,
            fallbacks=self._fallbacks_used,
            pauses=self._pauses,
        )

    def stop(self, reason: str = "stopped by the caller") -> None:
        """Stop admitting: queued and later jobs fail with RunStopped; in-flight jobs finish."""
        self._stop(errors.RunStopped(reason))

    # ------------------------------------------------------------------ building jobs

    def _build_body(
        self, request: str | Sequence[Mapping[str, Any]] | Mapping[str, Any], endpoint: str | None,
        extra: Mapping[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        return build_body(request, endpoint, extra, self.model)

    async def _new_job(
        self, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int, timeout_s: float | None,
        cacheable: bool | None = None,
    ) -> _Job:
        if self._task_group is None or self._closing:
            raise errors.PoolClosed("the pool is not running: use it inside 'async with Pool(...)'")
        estimator = self.estimator
        if estimator.prompt_chars(endpoint, body) > _THREAD_ESTIMATE_CHARS:
            estimate = await anyio.to_thread.run_sync(estimator.estimate, endpoint, body)
        else:
            estimate = estimator.estimate(endpoint, body)
        sequence = next(self._sequence)
        now = self._clock.now()
        deadline = now + timeout_s if timeout_s is not None else None
        job = _Job(
            endpoint, body, custom_id if custom_id is not None else f"request-{sequence}",
            priority, sequence, estimate, now, deadline,
        )
        if self._cache is not None and cacheable is not False and (cacheable or is_deterministic(endpoint, body)):
            job.cache_key = cache_key(self._cache_scope, endpoint, body)
        return job

    async def _enqueue(self, job: _Job) -> None:
        self._submitted += 1
        self._outstanding += 1
        assert self._idle is not None
        self._idle.clear()
        # A cached answer costs nothing and touches no limit: served even after the run stopped.
        if job.cache_key is not None and await self._answer_from_cache(job):
            return
        limits = self._limiter.snapshot() if self._limiter is not None else None
        if self._stopped is not None:
            await self._fail(job, type(self._stopped), str(self._stopped))
        elif limits is not None and limits.tpm is not None and job.estimate > limits.tpm:
            await self._fail(
                job, errors.RequestTooLarge,
                f"the request needs about {job.estimate} tokens, more than the whole limit of {limits.tpm} TPM",
            )
        elif self._budget is not None and self.prices.price(_str_or_none(job.body.get("model")) or "") is None:
            # Not a stop: this job cannot be accounted for; a rerun with its price (prices=) runs it.
            await self._fail(
                job, errors.BudgetExhausted,
                f"no price is known for model {job.body.get('model')!r}: under a budget every model needs one",
            )
        else:
            try:
                await self._queue.put(job)
            except BaseException:
                # Cancelled while waiting for room: the job never entered the queue.
                self._abandon_flight(job)
                self._submitted -= 1
                self._settle()
                raise

    # ------------------------------------------------------------------ response cache

    async def _answer_from_cache(self, job: _Job) -> bool:
        """Serve ``job`` from the cache or from an identical job in flight; False: it must be run."""
        key, cache = job.cache_key, self._cache
        assert key is not None and cache is not None
        leader = self._flights.get(key)
        if leader is not None:
            # Single flight: one call answers every identical request made while it runs.
            if leader.followers is None:
                leader.followers = []
            leader.followers.append(job)
            return True
        self._flights[key] = job  # from now on, identical jobs follow this one, even during the lookup
        try:
            raw = await cache.get(key)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the job never entered the pool
                self._abandon_flight(job)
                self._submitted -= 1
                self._settle()
                raise
            self._cache_error("get", exc)
            raw = None
        entry = CachedResponse.loads(raw) if raw is not None else None
        if entry is None:
            self._cache_misses += 1
            return False
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=200, body=entry.body,
            request_id=entry.request_id, usage=Usage.from_body(entry.body), attempts=0,
            latency_s=self._clock.now() - job.submitted_at, model=entry.model, cost_usd=0.0, cached=True,
        )
        self._count_hit(result, entry.cost_usd)
        await self._finish(job, result)
        await self._land(job, result, entry.cost_usd)
        return True

    def _count_hit(self, result: Result, saved_usd: float | None) -> None:
        self._cache_hits += 1
        self._cache_saved_usd += saved_usd or 0.0
        self._succeeded += 1
        if result.truncated:
            self._truncated += 1

    async def _store(self, job: _Job, result: Result) -> None:
        assert job.cache_key is not None and self._cache is not None
        entry = CachedResponse(result.body, result.model, result.request_id, result.cost_usd)
        try:
            await self._cache.set(job.cache_key, entry.dumps())
        except Exception as exc:
            self._cache_error("set", exc)

    def _cache_error(self, operation: str, exc: Exception) -> None:
        # A cache is an optimisation: when it fails, requests go to the API. Said once, not per request.
        if not self._cache_failed:
            self._cache_failed = True
            log.warning("cache_unavailable", operation=operation, error=redact(f"{type(exc).__name__}: {exc}")[:300])

    async def _land(self, job: _Job, result: Result, saved_usd: float | None) -> None:
        """Hand ``job``'s answer to the identical jobs that waited for it, and close its flight."""
        key = job.cache_key
        if key is None or self._flights.get(key) is not job:
            return
        del self._flights[key]
        for follower in job.followers or ():
            if follower.cancelled:
                self._settle()
                continue
            shared = dataclasses.replace(
                result, custom_id=follower.custom_id, attempts=0,
                latency_s=self._clock.now() - follower.submitted_at,
                cost_usd=0.0 if result.ok else None, cached=result.ok,
            )
            if shared.ok:
                self._count_hit(shared, saved_usd)
            else:
                self._failed += 1
            await self._finish(follower, shared)
        job.followers = None

    def _abandon_flight(self, job: _Job) -> None:
        """``job`` will not run: the first identical job still wanted runs in its place."""
        key = job.cache_key
        if key is None or self._flights.get(key) is not job:
            return
        del self._flights[key]
        waiting = []
        for follower in job.followers or ():
            if follower.cancelled:
                self._settle()
            else:
                waiting.append(follower)
        job.followers = None
        if waiting:
            successor = waiting[0]
            successor.followers = waiting[1:] or None
            self._flights[key] = successor
            self._queue.requeue(successor)

    # ------------------------------------------------------------------ dispatching

    def _job_task_done(self, task: asyncio.Task[None]) -> None:
        self._job_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._job_error is None:
            # A bug, not a job failure (those become error results): fail the whole pool loudly.
            self._job_error = task.exception()
            if self._idle is not None:
                self._idle.set()  # stop draining: the pool is failing

    def _running(self) -> anyio.abc.TaskGroup:
        if self._task_group is None:
            raise errors.PoolClosed("the pool is not running: use it inside 'async with Pool(...)'")
        return self._task_group

    async def _dispatch(self) -> None:
        """The only consumer of the queue: admits jobs in priority order as workers and limits allow."""
        queue, slots = self._queue, self._slots
        assert slots is not None
        while True:
            if not queue:
                await queue.wait_nonempty()
            await slots.acquire()
            try:
                job = await self._admit(queue.pop())
            except BaseException:
                slots.release()
                raise
            if job is None:
                slots.release()
                continue
            self._in_flight += 1
            # A bare asyncio task: anyio's start_soon costs several times more, and this is the hot path.
            task = asyncio.create_task(self._run(job))
            self._job_tasks.add(task)
            task.add_done_callback(self._job_task_done)

    async def _admit(self, job: _Job) -> _Job | None:
        """Wait until ``job`` (or a job that overtook it in priority meanwhile) fits the limits and the budget;
        charge it."""
        clock, queue = self._clock, self._queue
        while True:
            if job.cancelled:
                await self._drop_cancelled(job)
                return None
            if self._stopped is not None:
                await self._fail(job, type(self._stopped), str(self._stopped))
                return None
            now = clock.now()
            if job.deadline is not None and now >= job.deadline:
                await self._fail(job, errors.DeadlineExceeded, "the deadline passed while the job waited")
                return None
            reserve = 0.0
            if self._pause_until > now:
                await clock.sleep(self._pause_until - now)
            elif self._budget is not None and (reserve := await self._budget_room(job)) < 0:
                pass  # waited for jobs in flight to settle their cost, or stopped the run: look again
            else:
                limiter = self._limiter if not job.route else self._fallback_routes[job.route - 1][1]
                assert limiter is not None
                job.charged = limiter.scale(job.estimate)
                wait = await limiter.acquire(job.charged)
                if wait == 0.0:
                    job.attempts += 1
                    self._charged_tokens += job.charged
                    self._meter.add(now, job.charged)
                    if reserve:
                        job.reserved = reserve
                        self._reserved_usd += reserve
                        self._reserved_jobs += 1
                    return job
                await clock.sleep(wait)
            head = queue.head()
            if head is not None and (head.priority, head.sequence) < (job.priority, job.sequence):
                queue.requeue(job)
                job = queue.pop()

    async def _budget_room(self, job: _Job) -> float:
        """The worst-case cost of ``job`` if it fits the budget now; -1.0 after waiting for jobs in flight to
        settle (they usually cost far less than their reservation), or after stopping the run when it cannot
        fit even with nothing in flight."""
        assert self._budget is not None and self._budget_freed is not None
        price = self.prices.price(_str_or_none(job.body.get("model")) or "")
        assert price is not None  # checked at submit, and for fallbacks at construction
        output = output_reservation(job.endpoint, job.body, self.estimator.default_output_tokens)
        worst = price.worst_case(max(0, job.estimate - output), output)
        # A hair of tolerance: sums of float dollars must not stop a run that fits exactly.
        if self._cost_usd + self._reserved_usd + worst <= self._budget + 1e-9:
            return worst
        if self._reserved_jobs:
            self._budget_freed.clear()
            await self._budget_freed.wait()
        else:
            self._stop(errors.BudgetExhausted(
                f"the budget of ${self._budget:g} is spent: ${self._cost_usd:.6f} used, and the next job may cost "
                f"up to ${worst:.6f}"
            ))
        return -1.0

    def _release(self, job: _Job) -> None:
        """Give back a job's budget reservation: its attempt is over (its real cost, if any, is counted)."""
        assert self._budget_freed is not None
        self._reserved_jobs -= 1
        # Summing and subtracting floats drifts: with nothing in flight, nothing is reserved, exactly.
        self._reserved_usd = self._reserved_usd - job.reserved if self._reserved_jobs else 0.0
        job.reserved = 0.0
        self._budget_freed.set()

    # ------------------------------------------------------------------ running a job

    async def _run(self, job: _Job) -> None:
        """One attempt of an admitted job, then its result or its retry."""
        clock, slots, transport, limiter = self._clock, self._slots, self._transport, self._limiter
        if job.route:
            transport, limiter = self._fallback_routes[job.route - 1]
        assert limiter is not None and slots is not None
        sent_at = clock.now()
        mark = limiter.on_wire(job.charged)
        self._attempts += 1
        response: Response | None = None
        failure: TransportFailure | None = None
        streamed = False
        try:
            try:
                if job.stream_to is not None:
                    response, streamed = await self._stream_attempt(job, transport)
                else:
                    response = await transport.send(job.endpoint, job.body, timeout=self._timeout(job))
            except TransportFailure as exc:
                failure = exc
                streamed = isinstance(exc, _StreamCut) and exc.delivered
        finally:
            self._in_flight -= 1
            slots.release()
        refused = response is not None and response.status == 429
        # A 429 was not charged by the server: rate_limited() below handles it, and its headers must not
        # count in the calibration as if it had been.
        await limiter.observe(None if response is None or refused else response.headers, sent_at, mark)
        if response is None:
            assert failure is not None
            await self._retry_or_fail(job, None, None, f"no response: {failure}", streamed)
            return
        outcome = classify(response.status, response.headers, response.body)
        if outcome is Outcome.SUCCESS:
            await self._succeed(job, response, limiter)
        elif outcome is Outcome.RATE_LIMITED:
            self._rate_limited += 1
            delay = retry_after_s(response.headers)
            if delay is None:
                delay = self.backoff.delay(job.attempts, self._rng)
            self._pause(delay)
            await limiter.rate_limited(_limit_kind(response.body), job.charged)
            await self._retry_or_fail(job, response, 0.0, "rate limited (429)", streamed)
        elif outcome is Outcome.RETRY:
            await self._retry_or_fail(job, response, retry_after_s(response.headers), _describe(response), streamed)
        elif outcome is Outcome.JOB_FATAL:
            # A 404 is an unknown model (or a wrong endpoint): the next fallback may serve it.
            if response.status != 404 or not self._fall_back(job, _describe(response)):
                await self._fail(job, errors.RequestRejected, _describe(response), response)
        elif outcome is Outcome.QUOTA:
            await limiter.rate_limited(None, job.charged)
            message = f"the API reports the quota exhausted ({error_code(response.body)}): check plan and billing"
            self._stop(errors.QuotaExhausted(message))
            await self._fail(job, errors.QuotaExhausted, message, response)
        else:
            message = f"the API refused the key (HTTP {response.status}): check OPENAI_API_KEY and its permissions"
            self._stop(errors.AuthenticationFailed(message))
            await self._fail(job, errors.AuthenticationFailed, message, response)

    async def _stream_attempt(self, job: _Job, transport: Transport) -> tuple[Response, bool]:
        """Relay a streamed answer's deltas; returns the assembled body as a Response."""
        assert job.stream_to is not None
        delivered = False
        async with transport.stream(job.endpoint, job.body, timeout=self._timeout(job)) as answer:
            if answer.status != 200:
                return Response(answer.status, answer.headers, answer.body, answer.request_id), False
            parts: list[str] = []
            usage: Any = None
            finish: Any = None
            first: dict[str, Any] = {}
            try:
                async for chunk in answer.events:
                    first = first or chunk
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        finish = choice.get("finish_reason") or finish
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            parts.append(text)
                            delivered = True
                            await job.stream_to.send(text)
            except TransportFailure as exc:
                raise _StreamCut(str(exc), delivered) from exc
        body = {
            "id": first.get("id"), "object": "chat.completion", "model": first.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": finish}],
            "usage": usage,
        }
        return Response(200, answer.headers, body, answer.request_id), delivered

    def _timeout(self, job: _Job) -> float:
        if job.deadline is None:
            return self.request_timeout_s
        return max(0.001, min(self.request_timeout_s, job.deadline - self._clock.now()))

    def _pause(self, delay: float) -> None:
        until = self._clock.now() + delay
        if until > self._pause_until:
            self._pause_until = until
            self._pauses += 1
            # Info, not a warning: pausing on a 429 is the pool doing its job; statistics().pauses counts them.
            log.info("dispatch_paused", delay_s=round(delay, 3), reason="rate_limited")

    def _stop(self, error: errors.RunStopped) -> None:
        if self._stopped is None:
            self._stopped = error
            # A stop the caller asked for (Ctrl-C in the CLI) is no error.
            level = log.warning if type(error) is errors.RunStopped else log.error
            level("run_stopped", reason=str(error), code=error.code)

    async def _retry_or_fail(
        self, job: _Job, response: Response | None, delay: float | None, reason: str, streamed: bool
    ) -> None:
        if job.reserved:
            self._release(job)
        if streamed:
            await self._fail(job, errors.RetriesExhausted, f"the stream failed after output began: {reason}", response)
            return
        if job.attempts >= self.max_attempts:
            if self._fall_back(job, reason):
                return
            await self._fail(
                job, errors.RetriesExhausted, f"gave up after {job.attempts} attempts; last: {reason}", response
            )
            return
        backoff = self.backoff.delay(job.attempts, self._rng) if delay != 0.0 else 0.0
        delay = max(backoff, delay or 0.0)
        now = self._clock.now()
        if job.deadline is not None and now + delay >= job.deadline:
            await self._fail(job, errors.DeadlineExceeded, f"no time left to retry; last: {reason}", response)
            return
        self._retries += 1
        log.info("job_retrying", custom_id=job.custom_id, attempt=job.attempts, delay_s=round(delay, 3),
                 reason=redact(reason))
        if delay > 0:
            # The worker slot is already free: a job waiting out its backoff holds no worker.
            await self._clock.sleep(delay)
        self._queue.requeue(job)

    def _fall_back(self, job: _Job, reason: str) -> bool:
        """Requeue ``job`` against the next fallback model, with fresh attempts; False when none is left."""
        if job.route >= len(self._fallbacks):
            return False
        if job.reserved:
            self._release(job)
        fallback = self._fallbacks[job.route]
        log.warning("job_fallback", custom_id=job.custom_id, model=fallback.model,
                    failed_model=_str_or_none(job.body.get("model")), reason=redact(reason))
        job.route += 1
        job.body = {**job.body, "model": fallback.model}
        job.attempts = 0
        self._fallbacks_used += 1
        self._queue.requeue(job)
        return True

    # ------------------------------------------------------------------ finishing

    async def _succeed(self, job: _Job, response: Response, limiter: Limiter) -> None:
        usage = Usage.from_body(response.body)
        model = _str_or_none(job.body.get("model"))
        cost = None
        if usage is not None:
            self._prompt_tokens += usage.prompt_tokens
            self._completion_tokens += usage.completion_tokens
            limits = limiter.snapshot()
            if limits is not None and limits.refund_unused:
                unused = job.charged - usage.total_tokens
                if unused > 0:
                    await limiter.refund(unused)
            cost = self.prices.cost(model, usage)
            if cost is not None:
                self._cost_usd += cost
        if job.reserved:
            self._release(job)  # after its real cost is counted: the budget always sees one or the other
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=response.status, body=response.body,
            request_id=response.request_id, usage=usage, attempts=job.attempts,
            latency_s=self._clock.now() - job.submitted_at, model=model, cost_usd=cost,
        )
        if result.truncated:
            self._truncated += 1
        self._succeeded += 1
        if job.cache_key is not None:
            await self._store(job, result)
            await self._finish(job, result)
            await self._land(job, result, cost)
        else:
            await self._finish(job, result)

    async def _fail(
        self, job: _Job, kind: type[errors.JobError], message: str, response: Response | None = None
    ) -> None:
        if job.reserved:
            self._release(job)
        message = redact(message)
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint,
            status=response.status if response is not None else None,
            body=_redact_body(response.body) if response is not None else None,
            request_id=response.request_id if response is not None else None,
            attempts=job.attempts, latency_s=self._clock.now() - job.submitted_at,
            error=ErrorInfo(kind.code, message), model=_str_or_none(job.body.get("model")),
        )
        self._failed += 1
        log.warning("job_failed", custom_id=job.custom_id, code=kind.code, attempt=job.attempts,
                    status=result.status, message=message)
        await self._finish(job, result)
        if job.cache_key is not None:
            await self._land(job, result, None)

    async def _drop_cancelled(self, job: _Job) -> None:
        # The submitter went away: nobody waits for this result, and no request is sent.
        if job.cache_key is not None:
            self._abandon_flight(job)
        self._settle()

    async def _finish(self, job: _Job, result: Result) -> None:
        if self._observers:
            for observer in self._observers:
                try:
                    observer(result)
                except Exception as exc:
                    log.warning("observer_failed", error=redact(f"{type(exc).__name__}: {exc}")[:300])
        if self.sink is not None:
            await self.sink.write(result)
        if job.stream_to is not None:
            await job.stream_to.aclose()
        if job.future is not None and not job.future.done():
            job.future.set_result(result)
        elif job.deliver is not None:
            await job.deliver.deliver(result)
        self._settle()

    def _settle(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0 and self._idle is not None:
            self._idle.set()


class _StreamCut(TransportFailure):
    def __init__(self, message: str, delivered: bool) -> None:
        super().__init__("connection", message)
        self.delivered = delivered


class _MapCollector:
    """Holds map() results until the reader takes them.

    ``room`` bounds the results fed and not yet read, so delivery never has to wait: a plain deque and one
    waiter (an anyio memory stream costs a fifth of a job's time on this path).
    """

    __slots__ = ("_done_feeding", "_gone", "_results", "_waiter", "pending", "room")

    def __init__(self, most_unread: int) -> None:
        #: jobs fed and not yet delivered
        self.pending = 0
        #: one unit per job fed and not yet read
        self.room = asyncio.Semaphore(most_unread)
        self._results: deque[Result] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done_feeding = False
        self._gone = False

    async def deliver(self, result: Result) -> None:
        self.pending -= 1
        if self._gone:
            self.room.release()  # nobody reads any more: the result still went to the sink
        else:
            self._results.append(result)
        self._wake()

    def feeding_done(self) -> None:
        self._done_feeding = True
        self._wake()

    async def next(self) -> Result | None:
        """The next result, or None after the last."""
        while not self._results:
            if self._done_feeding and self.pending == 0:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.room.release()
        return self._results.popleft()

    def reader_gone(self) -> None:
        self._gone = True
        for _ in self._results:
            self.room.release()
        self._results.clear()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class PoolStream:
    """The text deltas of a streamed job (async iterator); ``result`` holds the whole Result afterwards."""

    def __init__(
        self, pool: Pool, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int,
        timeout_s: float | None,
    ) -> None:
        self._pool = pool
        self._args = (endpoint, body, custom_id, priority, timeout_s)
        self._receive: MemoryObjectReceiveStream[str] | None = None
        self._future: asyncio.Future[Result] | None = None
        #: the job's Result, once the stream has ended
        self.result: Result | None = None

    def __aiter__(self) -> PoolStream:
        return self

    async def __anext__(self) -> str:
        if self._receive is None:
            job = await self._pool._new_job(*self._args, cacheable=False)  # a stream is not replayed
            send, self._receive = anyio.create_memory_object_stream[str](64)
            job.stream_to = send
            self._future = job.future = asyncio.get_running_loop().create_future()
            await self._pool._enqueue(job)
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            assert self._future is not None
            self._receive.close()
            self.result = result = await self._future
            if result.error is not None:
                raise _ERROR_CLASSES.get(result.error.code, errors.JobError)(result.error.message, result) from None
            raise StopAsyncIteration from None


def _limit_scope(client: Any, model: str | None) -> str:
    """What one shared budget is: base URL, a fingerprint of the key (never the key itself), and model."""
    import hashlib

    key = str(getattr(client, "api_key", "") or "")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{getattr(client, 'base_url', '')}|{fingerprint}|{model or ''}"


def _describe(response: Response) -> str:
    body = response.body
    message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    detail = f": {str(message)[:300]}" if message else ""
    return redact(f"HTTP {response.status}{detail}")


def _redact_body(body: Any) -> Any:
    """An error body with its message redacted: a 401's message can quote the key."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if isinstance(message, str):
            return {**body, "error": {**body["error"], "message": redact(message)}}
    return body


def _limit_kind(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        kind = body["error"].get("type")
        if kind in ("requests", "tokens"):
            return str(kind)
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
