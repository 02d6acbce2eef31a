"""The pool: a priority queue, one dispatcher that admits jobs through the limiter, and N workers.

::

    submit()/map()/stream() ──► JobQueue ──► dispatcher ──(limiter: RPM + TPM; budget)──► worker ──► Transport
                                   ▲                                                        │
                                   └──── requeue after backoff ◄── classify the answer ◄────┴──► Sink, caller

Every job settles exactly once (a result or a typed error) whatever happens on its path: an unexpected exception
becomes an ``internal_error`` result, a deadline fails the job wherever it waits, and leaving ``async with``
settles every job still pending. The parts live in modules of their own: :mod:`scheduler._job` (a job's state),
:mod:`scheduler._budget`, :mod:`scheduler._flights` (cache and single flight), :mod:`scheduler.streaming`,
:mod:`scheduler._map`, :mod:`scheduler.statistics`, :mod:`scheduler.requests` (bodies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import errors
from ._budget import Budget, cap_output
from ._flights import Flights, ResponseCache
from ._job import Job, State
from ._map import MapCollector
from .cache import CacheBackend, MemoryCache, cache_key, is_deterministic, open_cache
from .clock import Clock, LoopClock
from .cost import ModelPrice, PriceTable
from .fallbacks import Fallback
from .limits import ClockedLimiter, Limiter, Limits
from .logs import redact, redact_value, register_secret, traceback_text
from .queue import JobQueue
from .requests import Request, build_body
from .results import ErrorInfo, Result, Usage
from .retry import Backoff, Outcome, answer_problem, classify, error_code, retry_after_s
from .sinks import Sink
from .statistics import Counters, PoolStatistics, RateMeter
from .streaming import PoolStream, StreamBroken, relay, stream_channel
from .tokens import TokenEstimator
from .transport import OpenAITransport, Response, Transport, TransportFailure

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream
    from openai import AsyncOpenAI

__all__ = ["Pool"]

log = structlog.get_logger("scheduler")

# Prompts longer than this are tokenized in a thread, off the event loop.
_THREAD_ESTIMATE_CHARS = 100_000

Prompt = str | Sequence[Mapping[str, Any]] | Mapping[str, Any]


class Pool:
    """Schedules requests to an OpenAI-compatible API within its rate limits.

    Args:
        client: an ``openai.AsyncOpenAI`` for any OpenAI-compatible endpoint (its own retries are turned off:
            the pool retries). Default: ``AsyncOpenAI()`` configured from the environment.
        model: the model for string prompts and message lists, and for bodies without one.
        limits: the rate limits to stay under; ``None`` learns them from the response headers (one request at
            a time until an answer carries them).
        workers: the most requests in flight at once.
        max_attempts: attempts per job that may fail (5xx, timeouts, dropped connections, invalid answers),
            counting the first. 429s do not count: they are bounded by ``max_rate_limited_s``.
        backoff: the jittered exponential backoff between retries.
        request_timeout_s: timeout of one HTTP attempt.
        queue_size: jobs queued before ``submit`` waits (backpressure).
        sink: receives every result (e.g. :class:`~scheduler.JsonlSink`).
        default_max_tokens: output reservation charged for requests without an output cap (under a budget it
            is also sent as the request's cap, so the worst case held is the worst case possible).
        redis: a Redis URL: the RPM/TPM buckets live there, shared by every pool that uses the same API key,
            base URL and model (requires ``limits``).
        prices: model prices added to (or replacing) the built-in list prices: a mapping of model name to
            :class:`~scheduler.cost.ModelPrice` or ``{"input", "cached_input", "output"}`` (USD per 1M tokens),
            or the path of a JSON file of them. Costs land in ``Result.cost_usd`` and ``statistics().cost_usd``.
        budget_usd: a hard limit on spending, in US dollars: each attempt in flight holds the most it can cost
            until its real cost is known, and an attempt that got no answer counts its worst case as spent; when
            the next job cannot fit even with nothing in flight, it and every later job fail with
            BudgetExhausted. Every model used must have a price.
        cache: the response cache for deterministic requests: a :class:`~scheduler.cache.CacheBackend`, ``True``
            for an in-memory LRU, or a path (SQLite) or ``redis://`` URL that the pool opens and closes.
        fallbacks: models (or :class:`Fallback` s with their own client and limits) tried in order when a job's
            model is unavailable (404) or its retries run out.
        max_pause_s: the longest a 429's ``retry-after`` pauses all dispatch (a longer ask is capped, with a
            warning).
        max_rate_limited_s: how long a job may keep meeting 429s before it fails (RetriesExhausted).
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
        max_pause_s: float = 60.0,
        max_rate_limited_s: float = 600.0,
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
        if not max_pause_s > 0 or not max_rate_limited_s > 0:
            raise errors.ConfigurationError("max_pause_s and max_rate_limited_s must be positive")
        if transport is None:
            if client is None:
                from openai import AsyncOpenAI

                client = AsyncOpenAI()
            transport = OpenAITransport(client)
        register_secret(getattr(client, "api_key", None))
        self._client = client
        self.model = model
        self.workers = workers
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.request_timeout_s = request_timeout_s
        self.max_pause_s = max_pause_s
        self.max_rate_limited_s = max_rate_limited_s
        self.sink = sink
        #: the token estimator, a public seam: replace it to count tokens another way
        self.estimator = TokenEstimator(default_max_tokens)
        self.prices = PriceTable.load(prices)
        self._fallbacks = tuple(f if isinstance(f, Fallback) else Fallback(model=f) for f in fallbacks)
        self._budget: Budget | None = None
        if budget_usd is not None:
            self._budget = Budget(float(budget_usd), self.prices, default_max_tokens)
            for name in (model, *(f.model for f in self._fallbacks)):
                if name is not None and not self._budget.priced(name):
                    raise errors.ConfigurationError(f"a budget needs a price for every model: none for {name!r}")
        self._fallback_transports: list[Transport] = []
        for fallback in self._fallbacks:
            if fallback.client is not None:
                register_secret(getattr(fallback.client, "api_key", None))
            self._fallback_transports.append(
                fallback.transport or (OpenAITransport(fallback.client) if fallback.client is not None else transport)
            )
        self._cache: ResponseCache | None = None
        self._owned_cache: CacheBackend | None = None
        if cache is True:
            self._cache = ResponseCache(MemoryCache())
        elif isinstance(cache, str | os.PathLike):
            self._owned_cache = open_cache(cache)
            self._cache = ResponseCache(self._owned_cache)
        elif cache is not None and cache is not False:
            self._cache = ResponseCache(cache)
        # Answers differ between providers and organisations serving the same model name: the base URL and a
        # fingerprint of the key scope every cache key.
        self._cache_scope = _limit_scope(client, None)
        self._flights = Flights()
        self._observers: list[Callable[[Result], None]] = []
        self._redis_url = redis
        self._limit_scope = _limit_scope(client, model)
        self._transport = transport
        self._clock: Clock = clock or LoopClock()
        self._limits = limits
        self._limiter = limiter
        self._rng = rng or random.Random()
        self._queue: JobQueue[Job] = JobQueue(queue_size)
        self._sequence = itertools.count()
        #: (transport, limiter) of the primary model (route 0) and of each fallback
        self._routes: list[tuple[Transport, Limiter]] = []
        #: limiters the pool opened itself (Redis connections), and so closes
        self._owned_limiters: list[Any] = []
        self._counters = Counters()
        self._meter = RateMeter()
        #: jobs not settled yet: whatever happens, each of them settles before the pool is gone
        self._live: set[Job] = set()
        #: attempt tasks and settling tasks the pool must see finish
        self._tasks: set[asyncio.Task[None]] = set()
        self._feeders: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: asyncio.Event | None = None
        self._budget_freed: asyncio.Event | None = None
        self._napping: asyncio.Future[None] | None = None
        self._pause_until = -math.inf
        self._stopped: errors.RunStopped | None = None
        self._fatal: BaseException | None = None
        self._running = False
        self._closing = False
        self._close_reason = "the pool closed"

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
        self._routes = [(self._transport, self._limiter)]
        for fallback, transport in zip(self._fallbacks, self._fallback_transports, strict=True):
            limiter: Limiter = ClockedLimiter(fallback.limits, self._clock)
            if self._redis_url is not None and fallback.limits is not None:
                from .redis_limiter import RedisLimiter

                scope = _limit_scope(fallback.client or self._client, fallback.model)
                limiter = await RedisLimiter.connect(self._redis_url, fallback.limits, scope=scope)
                self._owned_limiters.append(limiter)
            self._routes.append((transport, limiter))
        self._slots = asyncio.Semaphore(self.workers)
        self._idle = asyncio.Event()
        self._idle.set()
        self._budget_freed = asyncio.Event()
        self._running = True
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        self._dispatcher.add_done_callback(self._dispatcher_done)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        assert self._idle is not None
        try:
            if exc_type is None:
                # Drain: every submitted job finishes (or fails) before the pool closes.
                await self._idle.wait()
        finally:
            # Shielded: leaving because of a cancellation, the pending jobs must still be settled and awaited.
            with anyio.CancelScope(shield=True):
                await self._close(exc_type if exc_type is not None else None)
        # The caller's own exception propagates as itself (this returns None); a bug of the pool's is raised.
        if self._fatal is not None and exc_type is None:
            raise self._fatal

    async def _close(self, exc_type: type[BaseException] | None) -> None:
        self._closing = True
        self._running = False
        why = "the pool closed" if exc_type is None else f"the pool closed on {exc_type.__name__}"
        self._close_reason = why
        pending = [job for job in self._live if job.state is not State.RUNNING]
        for job in self._live:
            if job.state is State.RUNNING and job.task is not None:
                job.stop_reason = "closing"
                job.task.cancel()
        for job in pending:
            await self._fail(job, errors.RunStopped, f"{why} before the job ran")
        for task in (self._dispatcher, *self._feeders):
            if task is not None:
                task.cancel()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._dispatcher is not None:
            await asyncio.gather(self._dispatcher, *self._feeders, return_exceptions=True)
        for owned in self._owned_limiters:
            await owned.aclose()
        self._owned_limiters.clear()
        if self.sink is not None:
            await self.sink.aclose()
        if self._owned_cache is not None:
            await self._owned_cache.aclose()

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        # A bug of ours, not a job's failure: say it loudly, stop admitting, let every job settle.
        self._fatal = exc
        log.error("dispatcher_failed", error=redact(f"{type(exc).__name__}: {exc}"), traceback=traceback_text(exc))
        self._stop(errors.RunStopped(f"the pool's dispatcher failed ({type(exc).__name__}); see the log"))

    # ------------------------------------------------------------------ submitting

    async def submit(
        self,
        request: Prompt,
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
        endpoint, full_body = build_body(request, endpoint, body, self.model)
        job = await self._new_job(endpoint, full_body, custom_id, priority, timeout_s, cache)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        job.future = future
        await self._enqueue(job)
        try:
            # Not shielded: cancelling the caller abandons the job (a request in flight is cancelled too).
            result = await future
        except asyncio.CancelledError:
            self._abandon(job)
            raise
        if raise_errors and result.error is not None:
            raise errors.error_for(result)
        return result

    def stream(
        self,
        request: Prompt,
        *,
        priority: int = 0,
        custom_id: str | None = None,
        timeout_s: float | None = None,
        **body: Any,
    ) -> PoolStream:
        """Stream a chat completion's text deltas; the job is admitted like any other.

        Iterate the returned :class:`PoolStream` for text; afterwards ``.result`` holds usage and the whole
        text. A failure before the first delta is retried; after it, the stream raises the job's error. Leaving
        the loop early cancels the request.
        """
        endpoint, full_body = build_body(request, None, body, self.model)
        if not endpoint.endswith("chat/completions"):
            raise errors.ConfigurationError("stream() supports chat completions")
        options = dict(full_body.get("stream_options") or {})
        options["include_usage"] = True
        full_body = {**full_body, "stream": True, "stream_options": options}

        async def start() -> tuple[Job, MemoryObjectReceiveStream[str]]:
            job = await self._new_job(endpoint, full_body, custom_id, priority, timeout_s, False)
            job.stream_to, receive = stream_channel()
            job.future = asyncio.get_running_loop().create_future()
            await self._enqueue(job)
            return job, receive

        return PoolStream(start, self._abandon)

    def add_observer(self, observer: Callable[[Result], None]) -> None:
        """Call ``observer(result)`` for every result, as it is delivered (metrics use it). It must be quick,
        and what it raises is logged and ignored."""
        self._observers.append(observer)

    async def map(
        self, requests: Iterable[Request | Prompt] | AsyncIterable[Request | Prompt], *, buffer: int = 256,
        **body: Any,
    ) -> AsyncIterator[Result]:
        """Run many requests and yield their results (errors included) as they complete.

        Memory stays bounded however many requests come in: they are read from ``requests`` only as the queue
        has room, and a consumer that falls ``buffer`` results behind slows the workers down. Keyword arguments
        go into every request's body, as for :meth:`submit` (``map(prompts, max_tokens=20)``).
        """
        # Fed but not yet read, at most: a slow reader then slows the feed instead of results piling up.
        collector = MapCollector(self._queue.maxsize + self.workers + buffer)
        failure: list[BaseException] = []

        async def feed() -> None:
            try:
                if isinstance(requests, AsyncIterable):
                    async for item in requests:
                        await self._feed_one(item, collector, body)
                else:
                    for item in requests:
                        await self._feed_one(item, collector, body)
            except Exception as exc:
                failure.append(exc)
            finally:
                collector.feeding_done()

        self._check_running()
        task = asyncio.get_running_loop().create_task(feed())
        self._feeders.add(task)
        task.add_done_callback(self._feeders.discard)
        try:
            while (result := await collector.next()) is not None:
                yield result
        finally:
            collector.reader_gone()
            task.cancel()
        if failure:
            raise failure[0]

    async def _feed_one(self, item: Request | Prompt, collector: MapCollector, extra: Mapping[str, Any]) -> None:
        await collector.room.acquire()
        try:
            if isinstance(item, Request):
                endpoint, body = build_body(item.body, item.endpoint, extra, self.model)
                job = await self._new_job(endpoint, body, item.custom_id, item.priority, item.timeout_s,
                                          item.cacheable)
            else:
                endpoint, body = build_body(item, None, extra, self.model)
                job = await self._new_job(endpoint, body, None, 0, None)
            job.deliver = collector
            collector.pending += 1
            try:
                await self._enqueue(job)
            except BaseException:
                collector.pending -= 1
                raise
        except BaseException:
            collector.room.release()
            raise

    def statistics(self) -> PoolStatistics:
        """The pool's counters and current rates."""
        c, budget, limiter = self._counters, self._budget, self._limiter
        rpm, tpm = self._meter.per_minute(self._clock.now())
        ratio = getattr(getattr(limiter, "local", limiter), "ratio", 1.0)
        return PoolStatistics(
            submitted=c.submitted, queued=len(self._queue), in_flight=c.in_flight, succeeded=c.succeeded,
            failed=c.failed, retries=c.retries, rate_limited=c.rate_limited, attempts=c.attempts,
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, charged_tokens=c.charged_tokens,
            requests_per_minute=rpm, tokens_per_minute=tpm,
            limits=limiter.snapshot() if limiter is not None else self._limits, token_ratio=float(ratio),
            truncated=c.truncated, cost_usd=c.cost_usd,
            stopped=str(self._stopped) if self._stopped is not None else None,
            budget_usd=budget.limit_usd if budget else None, reserved_usd=budget.reserved_usd if budget else 0.0,
            uncertain_usd=budget.uncertain_usd if budget else 0.0, cache_hits=c.cache_hits,
            cache_misses=c.cache_misses, cache_saved_usd=c.cache_saved_usd, fallbacks=c.fallbacks, pauses=c.pauses,
            internal_errors=c.internal_errors,
        )

    def stop(self, reason: str = "stopped by the caller") -> None:
        """Stop admitting: queued and later jobs fail with RunStopped; in-flight jobs finish."""
        self._stop(errors.RunStopped(reason))

    # ------------------------------------------------------------------ building and queueing jobs

    def _check_running(self) -> None:
        if not self._running:
            raise errors.PoolClosed("the pool is not running: use it inside 'async with Pool(...)'")

    async def _new_job(
        self, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int, timeout_s: float | None,
        cacheable: bool | None = None,
    ) -> Job:
        self._check_running()
        if self._budget is not None:
            # The reservation charged becomes the request's cap: the worst case held is the worst case possible.
            body = dict(cap_output(endpoint, body, self.estimator.default_output_tokens))
        estimator = self.estimator
        if estimator.prompt_chars(endpoint, body) > _THREAD_ESTIMATE_CHARS:
            estimate = await anyio.to_thread.run_sync(estimator.estimate, endpoint, body)
        else:
            estimate = estimator.estimate(endpoint, body)
        sequence = next(self._sequence)
        now = self._clock.now()
        deadline = now + timeout_s if timeout_s is not None else None
        job = Job(endpoint, body, custom_id if custom_id is not None else f"request-{sequence}", priority,
                  sequence, estimate, now, deadline)
        if self._cache is not None and cacheable is not False and (cacheable or is_deterministic(endpoint, body)):
            job.cache_key = cache_key(self._cache_scope, endpoint, body)
        return job

    async def _enqueue(self, job: Job) -> None:
        assert self._idle is not None
        self._counters.submitted += 1
        self._live.add(job)
        self._idle.clear()
        if job.deadline is not None:
            job.deadline_timer = self._clock.call_at(job.deadline, functools.partial(self._expire, job))
        try:
            # A cached answer costs nothing and touches no limit: served even after the run stopped.
            if job.cache_key is not None and await self._answered_by_cache(job):
                return
            limits = self._limiter.snapshot() if self._limiter is not None else None
            if self._stopped is not None:
                await self._fail(job, type(self._stopped), str(self._stopped))
            elif limits is not None and limits.tpm is not None and job.estimate > limits.tpm:
                await self._fail(job, errors.RequestTooLarge, _too_large(job, limits.tpm))
            elif self._budget is not None and not self._budget.priced(job.model):
                # Not a stop: this job cannot be accounted for; a rerun with its price (prices=) runs it.
                await self._fail(job, errors.BudgetExhausted,
                                 f"no price is known for model {job.model!r}: under a budget every model needs one")
            else:
                await self._queue.put(job)
        except BaseException:
            if job.state is not State.SETTLED:
                # Cancelled while waiting for room: the job never entered the pool.
                self._counters.submitted -= 1
                self._drop(job)
            raise

    async def _answered_by_cache(self, job: Job) -> bool:
        """Serve ``job`` from the cache, or make it follow an identical job in flight; False: it must run."""
        assert job.cache_key is not None and self._cache is not None
        if self._flights.join(job):
            return True
        entry = await self._cache.lookup(job.cache_key)
        if entry is None:
            self._counters.cache_misses += 1
            return False
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=200, body=entry.body,
            request_id=entry.request_id, usage=Usage.from_body(entry.body), attempts=0,
            latency_s=self._clock.now() - job.submitted_at, model=entry.model, cost_usd=0.0, cached=True,
        )
        self._counters.cache_saved_usd += entry.cost_usd or 0.0
        await self._finish(job, result, saved_usd=entry.cost_usd)
        return True

    # ------------------------------------------------------------------ dispatching

    async def _dispatch(self) -> None:
        """The only consumer of the queue: admits jobs in priority order as workers and limits allow."""
        queue, slots = self._queue, self._slots
        assert slots is not None
        while True:
            if not queue:
                await queue.wait_nonempty()
            await slots.acquire()
            if not queue:  # a stop emptied it meanwhile
                slots.release()
                continue
            job = queue.pop()
            try:
                admitted = await self._admit(job) if job.state is State.QUEUED else None
            except Exception as exc:
                # A bug on one job's way (a limiter that raised, say) fails that job, not the dispatcher.
                slots.release()
                await self._internal_error(job, exc)
                continue
            except BaseException:
                slots.release()
                raise
            if admitted is None:
                slots.release()
            else:
                self._launch(admitted)

    async def _admit(self, job: Job) -> Job | None:
        """Wait until ``job`` (or a job that overtook it in priority meanwhile) fits the limits and the budget;
        charge it. None: the job settled instead (failed, expired, abandoned)."""
        clock, queue = self._clock, self._queue
        while True:
            if job.state is not State.QUEUED:
                return None
            if job.abandoned:
                self._drop(job)
                return None
            if self._stopped is not None:
                await self._fail(job, type(self._stopped), str(self._stopped))
                return None
            now = clock.now()
            if job.deadline is not None and now >= job.deadline:
                await self._fail(job, errors.DeadlineExceeded, "the deadline passed while the job waited")
                return None
            until = job.deadline if job.deadline is not None else math.inf
            _, limiter = self._routes[job.route]
            limits = limiter.snapshot()
            worst = 0.0
            if self._pause_until > now:
                await self._nap(min(self._pause_until, until) - now)
            elif limits is not None and limits.tpm is not None and job.estimate > limits.tpm:
                await self._fail(job, errors.RequestTooLarge, _too_large(job, limits.tpm))
                return None
            elif self._budget is not None and not self._budget.room_for(
                    worst := self._budget.worst_case(job.endpoint, job.body, job.estimate)):
                if self._budget.holding:
                    await self._wait_for_budget(until)  # jobs in flight usually cost far less than they hold
                else:
                    self._stop(errors.BudgetExhausted(self._budget.exhausted(worst)))
            else:
                job.charged = limiter.scale(job.estimate)
                try:
                    wait = await limiter.acquire(job.charged)
                except errors.RunStopped as exc:
                    self._stop(exc)
                    continue
                if wait == 0.0:
                    job.attempts += 1
                    self._counters.charged_tokens += job.charged
                    self._meter.add(now, job.charged)
                    if self._budget is not None:
                        job.reserved = worst
                        self._budget.hold(worst)
                    return job
                await self._nap(min(now + wait, until) - now)
            head = queue.head()
            if head is not None and (head.priority, head.sequence) < (job.priority, job.sequence):
                queue.requeue(job)
                job = queue.pop()

    async def _nap(self, seconds: float) -> None:
        """The dispatcher's sleep: a stop or the pool closing wakes it early."""
        waiter = asyncio.get_running_loop().create_future()
        timer = self._clock.call_at(self._clock.now() + max(0.0, seconds), functools.partial(_resolve, waiter))
        self._napping = waiter
        try:
            await waiter
        finally:
            timer.cancel()
            self._napping = None

    async def _wait_for_budget(self, until: float) -> None:
        assert self._budget_freed is not None
        self._budget_freed.clear()
        timer = self._clock.call_at(until, self._budget_freed.set) if until < math.inf else None
        try:
            await self._budget_freed.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._napping is not None and not self._napping.done():
            self._napping.set_result(None)
        if self._budget_freed is not None:
            self._budget_freed.set()

    def _pause(self, delay: float) -> float:
        """Pause all dispatch for ``delay`` seconds (capped at ``max_pause_s``); returns the pause taken."""
        if delay > self.max_pause_s:
            log.warning("pause_capped", asked_s=round(delay, 3), paused_s=self.max_pause_s,
                        detail="the server asked for a longer pause than max_pause_s; dispatch resumes sooner")
            delay = self.max_pause_s
        until = self._clock.now() + delay
        if until > self._pause_until:
            self._pause_until = until
            self._counters.pauses += 1
            # Info, not a warning: pausing on a 429 is the pool doing its job; statistics().pauses counts them.
            log.info("dispatch_paused", delay_s=round(delay, 3), reason="rate_limited")
        return delay

    def _stop(self, error: errors.RunStopped) -> None:
        """Stop admitting: jobs that are queued, waiting out a backoff or following another fail now."""
        if self._stopped is not None:
            return
        self._stopped = error
        # A stop the caller asked for (Ctrl-C in the CLI) is no error.
        level = log.warning if type(error) is errors.RunStopped else log.error
        level("run_stopped", reason=str(error), code=error.code)
        waiting = [job for job in self._live if job.state in (State.QUEUED, State.WAITING, State.FOLLOWING)]
        self._queue.clear()
        if waiting:
            self._spawn(self._fail_all(waiting, error))
        self._wake()

    async def _fail_all(self, jobs: list[Job], error: errors.RunStopped) -> None:
        for job in jobs:
            await self._fail(job, type(error), str(error))

    # ------------------------------------------------------------------ running a job

    def _launch(self, job: Job) -> None:
        job.state = State.RUNNING
        self._counters.in_flight += 1
        # A bare asyncio task: anyio's start_soon costs several times more, and this is the hot path.
        task = asyncio.get_running_loop().create_task(self._run(job))
        job.task = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._run_done, job))

    def _run_done(self, job: Job, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if job.task is not task:
            return  # an earlier attempt's task, ending after the job moved on
        job.task = None
        if job.state is State.RUNNING:
            # Cancelled before it started (so its own handlers never ran): its worker slot and its result.
            self._free_worker(job)
            self._spawn(self._cancelled(job))

    async def _run(self, job: Job) -> None:
        """One attempt of an admitted job, then its result, its retry or its error."""
        transport, limiter = self._routes[job.route]
        try:
            sent_at = self._clock.now()
            mark = limiter.on_wire(job.charged)
            self._counters.attempts += 1
            response: Response | None = None
            failure: TransportFailure | None = None
            try:
                if job.stream_to is not None:
                    response = await relay(job, transport, self._timeout(job))
                else:
                    response = await transport.send(job.endpoint, job.body, timeout=self._timeout(job))
            except TransportFailure as exc:
                failure = exc
            finally:
                self._free_worker(job)
            await self._observe(limiter, response, sent_at, mark)
            await self._conclude(job, response, failure, limiter)
        except asyncio.CancelledError:
            self._free_worker(job)
            await self._cancelled(job)
        except Exception as exc:
            self._free_worker(job)
            await self._internal_error(job, exc)

    def _free_worker(self, job: Job) -> None:
        """The attempt is over: its worker slot goes to the next job (once, however the attempt ended)."""
        if job.state is State.RUNNING:
            job.state = State.CONCLUDING
            self._counters.in_flight -= 1
            assert self._slots is not None
            self._slots.release()

    def _timeout(self, job: Job) -> float:
        if job.deadline is None:
            return self.request_timeout_s
        return max(0.001, min(self.request_timeout_s, job.deadline - self._clock.now()))

    async def _observe(self, limiter: Limiter, response: Response | None, sent_at: float,
                       mark: tuple[float, float]) -> None:
        # A 429 was not charged by the server: rate_limited() handles it, and its headers must not count in the
        # calibration as if it had been.
        refused = response is not None and response.status == 429
        try:
            await limiter.observe(None if response is None or refused else response.headers, sent_at, mark)
        except errors.RunStopped as exc:
            self._stop(exc)

    async def _conclude(
        self, job: Job, response: Response | None, failure: TransportFailure | None, limiter: Limiter
    ) -> None:
        """Act on one attempt's outcome (DESIGN section 4's table)."""
        if response is None:
            assert failure is not None
            self._release(job, uncertain=True)  # no answer: the server may have billed it
            if isinstance(failure, StreamBroken) and failure.delivered:
                await self._fail(job, errors.StreamIncomplete, f"the stream broke off after output began: {failure}")
            else:
                await self._retry(job, None, f"no response: {failure}")
            return
        job.last_response = response
        outcome = classify(response.status, response.headers, response.body)
        if outcome is Outcome.SUCCESS:
            problem = answer_problem(job.endpoint, response.body, response.is_json)
            if problem is None:
                await self._succeed(job, response, limiter)
                return
            self._release(job, uncertain=True)  # a proxy's page may stand for an answer that was billed
            await self._retry(job, response, problem, invalid=True)
            return
        self._release(job, uncertain=False)  # an error answer is not billed
        if outcome is Outcome.RATE_LIMITED:
            await self._rate_limited(job, response, limiter)
        elif outcome is Outcome.RETRY:
            await self._retry(job, response, _describe(response), retry_after_s(response.headers))
        elif outcome is Outcome.JOB_FATAL:
            # A 404 is an unknown model (or a wrong endpoint): the next fallback may serve it.
            if response.status != 404 or not self._fall_back(job, _describe(response)):
                await self._fail(job, errors.RequestRejected, _describe(response), response)
        elif outcome is Outcome.QUOTA:
            await self._tell_limiter(limiter.rate_limited(None, job.charged))
            message = f"the API reports the quota exhausted ({error_code(response.body)}): check plan and billing"
            self._stop(errors.QuotaExhausted(message))
            await self._fail(job, errors.QuotaExhausted, message, response)
        else:
            message = f"the API refused the key (HTTP {response.status}): check OPENAI_API_KEY and its permissions"
            self._stop(errors.AuthenticationFailed(message))
            await self._fail(job, errors.AuthenticationFailed, message, response)

    async def _rate_limited(self, job: Job, response: Response, limiter: Limiter) -> None:
        """A 429 says "not now", not "this request is bad": pause all dispatch, retry without using an attempt,
        for as long as ``max_rate_limited_s`` (or the deadline) allows."""
        self._counters.rate_limited += 1
        await self._tell_limiter(limiter.rate_limited(_limit_kind(response.body), job.charged))
        now = self._clock.now()
        if job.limited_since is None:
            job.limited_since = now
        asked = retry_after_s(response.headers)
        delay = self._pause(asked if asked is not None else self.backoff.delay(job.attempts, self._rng))
        if now - job.limited_since >= self.max_rate_limited_s:
            await self._fail(job, errors.RetriesExhausted,
                             f"still rate limited (429) after {now - job.limited_since:.0f} s of retries", response)
        elif job.deadline is not None and now + delay >= job.deadline:
            await self._fail(job, errors.DeadlineExceeded,
                             f"rate limited (429): the server asks for {delay:g} s, past the deadline", response)
        else:
            self._counters.retries += 1
            log.info("job_retrying", custom_id=job.custom_id, attempt=job.attempts, delay_s=0.0,
                     reason="rate limited (429)")
            self._requeue(job)  # the pause holds it back

    async def _tell_limiter(self, call: Any) -> None:
        try:
            await call
        except errors.RunStopped as exc:
            self._stop(exc)

    async def _retry(
        self, job: Job, response: Response | None, reason: str, retry_after: float | None = None,
        *, invalid: bool = False,
    ) -> None:
        """A failed attempt that may succeed later: back off and requeue, or give up after ``max_attempts``."""
        job.failures += 1
        job.last_problem = reason
        if job.failures >= self.max_attempts:
            if self._fall_back(job, reason):
                return
            if invalid:
                await self._fail(job, errors.InvalidResponse,
                                 f"gave up after {job.attempts} attempts; {reason}", response)
            else:
                await self._fail(job, errors.RetriesExhausted,
                                 f"gave up after {job.attempts} attempts; last: {reason}", response)
            return
        delay = max(self.backoff.delay(job.failures, self._rng), retry_after or 0.0)
        now = self._clock.now()
        if job.deadline is not None and now + delay >= job.deadline:
            await self._fail(job, errors.DeadlineExceeded, f"no time left to retry; last: {reason}", response)
            return
        self._counters.retries += 1
        log.info("job_retrying", custom_id=job.custom_id, attempt=job.attempts, delay_s=round(delay, 3),
                 reason=redact(reason))
        if delay > 0:
            # The worker slot is already free: a job waiting out its backoff holds no worker.
            job.state = State.WAITING
            job.timer = self._clock.call_at(now + delay, functools.partial(self._requeue, job))
        else:
            self._requeue(job)

    def _requeue(self, job: Job) -> None:
        if job.state in (State.QUEUED, State.WAITING, State.CONCLUDING):
            job.state = State.QUEUED
            job.timer = None
            if self._stopped is not None:
                self._spawn(self._fail(job, type(self._stopped), str(self._stopped)))
            else:
                self._queue.requeue(job)

    def _fall_back(self, job: Job, reason: str) -> bool:
        """Requeue ``job`` against the next fallback model, with fresh attempts; False when none is left."""
        if job.route >= len(self._fallbacks):
            return False
        fallback = self._fallbacks[job.route]
        log.warning("job_fallback", custom_id=job.custom_id, model=fallback.model, failed_model=job.model,
                    reason=redact(reason))
        job.route += 1
        job.body = {**job.body, "model": fallback.model}
        if job.cache_key is not None:
            # Its answer is the fallback's: stored under the fallback's request, never under the primary's.
            self._flights.leave(job, cache_key(self._cache_scope, job.endpoint, job.body))
        job.failures = 0
        job.limited_since = None
        self._counters.fallbacks += 1
        self._requeue(job)
        return True

    # ------------------------------------------------------------------ settling

    def _release(self, job: Job, *, uncertain: bool, spent: float | None = None) -> None:
        """End the budget hold of the attempt (its real cost known, or its worst case counted if unknown)."""
        if job.reserved and self._budget is not None:
            self._budget.release(job.reserved, spent=spent, uncertain=uncertain)
            job.reserved = 0.0
            if self._budget_freed is not None:
                self._budget_freed.set()

    async def _succeed(self, job: Job, response: Response, limiter: Limiter) -> None:
        usage = Usage.from_body(response.body)
        c = self._counters
        cost = None
        if usage is not None:
            c.prompt_tokens += usage.prompt_tokens
            c.completion_tokens += usage.completion_tokens
            limits = limiter.snapshot()
            if limits is not None and limits.refund_unused:
                unused = job.charged - usage.total_tokens
                if unused > 0:
                    await self._tell_limiter(limiter.refund(unused))
            cost = self.prices.cost(job.model, usage)
            if cost is not None:
                c.cost_usd += cost
        # An answer without usage may still have been billed: its worst case stays counted against the budget.
        self._release(job, uncertain=usage is None, spent=cost)
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=response.status, body=response.body,
            request_id=response.request_id, usage=usage, attempts=job.attempts,
            latency_s=self._clock.now() - job.submitted_at, model=job.model, cost_usd=cost,
        )
        if job.cache_key is not None and self._cache is not None:
            await self._cache.store(job.cache_key, result)
        await self._finish(job, result, saved_usd=cost)

    async def _fail(self, job: Job, kind: type[errors.JobError], message: str, response: Response | None = None
                    ) -> None:
        if job.state is State.SETTLED:
            return
        self._release(job, uncertain=False)
        response = response or job.last_response
        message = redact(message)
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint,
            status=response.status if response is not None else None,
            body=redact_value(response.body) if response is not None else None,
            request_id=response.request_id if response is not None else None,
            attempts=job.attempts, latency_s=self._clock.now() - job.submitted_at,
            error=ErrorInfo(kind.code, message), model=job.model,
        )
        log.warning("job_failed", custom_id=job.custom_id, code=kind.code, attempt=job.attempts,
                    status=result.status, message=message)
        await self._finish(job, result)

    async def _internal_error(self, job: Job, exc: Exception) -> None:
        """An exception nobody expected on a job's path: the job fails with internal_error, the pool goes on."""
        self._counters.internal_errors += 1
        log.error("job_internal_error", custom_id=job.custom_id, error=redact(f"{type(exc).__name__}: {exc}"),
                  traceback=traceback_text(exc))
        await self._fail(job, errors.InternalError, f"an unexpected error ended the job: {type(exc).__name__}: "
                                                    f"{exc}")

    async def _cancelled(self, job: Job) -> None:
        """The pool cancelled ``job``'s attempt: its deadline passed, its caller left, or the pool is closing."""
        self._release(job, uncertain=True)  # it was sent: the server may bill it
        if job.stop_reason == "abandoned" or job.abandoned:
            self._drop(job)
        elif job.stop_reason == "deadline":
            await self._fail(job, errors.DeadlineExceeded, "the deadline passed while the request was in flight")
        else:
            reason = self._close_reason if self._closing else str(self._stopped)
            await self._fail(job, errors.RunStopped, f"{reason} while the request was in flight")

    def _expire(self, job: Job) -> None:
        """The deadline timer: fail ``job`` wherever it waits."""
        if job.state in (State.SETTLED, State.CONCLUDING):
            return  # settled, or answered in time and being concluded
        if job.state is State.RUNNING and job.task is not None:
            job.stop_reason = "deadline"
            job.task.cancel()
        else:
            self._queue.remove(job)
            self._spawn(self._fail(job, errors.DeadlineExceeded, "the deadline passed while the job waited"))

    def _abandon(self, job: Job) -> None:
        """The caller went away (a cancelled submit, a stream left early): nobody waits for the result."""
        if job.state is State.SETTLED:
            return
        job.abandoned = True
        if job.state is State.RUNNING and job.task is not None:
            job.stop_reason = "abandoned"
            job.task.cancel()
        elif job.state in (State.WAITING, State.FOLLOWING) or (
                job.state is State.QUEUED and self._queue.remove(job)):
            self._drop(job)
        # Otherwise the dispatcher holds it (dropped when it looks again), or its answer is being concluded.

    def _drop(self, job: Job) -> None:
        """Settle ``job`` silently: nobody waits for it and no request is (or will be) sent."""
        if job.state is State.SETTLED:
            return
        self._settle(job)
        successor = self._flights.hand_over(job) if job.cache_key is not None else None
        if successor is not None:
            successor.state = State.QUEUED
            self._queue.requeue(successor)
        if job.stream_to is not None:
            job.stream_to.close()
        self._outstanding_done()

    def _settle(self, job: Job) -> None:
        job.state = State.SETTLED
        self._live.discard(job)
        for timer in (job.timer, job.deadline_timer):
            if timer is not None:
                timer.cancel()
        job.timer = job.deadline_timer = None

    async def _finish(self, job: Job, result: Result, *, saved_usd: float | None = None) -> None:
        """Deliver ``job``'s result (exactly once): counters, observers, sink, caller, and identical jobs."""
        if job.state is State.SETTLED:
            return
        self._settle(job)
        c = self._counters
        if result.ok:
            c.succeeded += 1
            if result.cached:
                c.cache_hits += 1
            if result.truncated:
                c.truncated += 1
        else:
            c.failed += 1
        for observer in self._observers:
            try:
                observer(result)
            except Exception as exc:
                log.warning("observer_failed", error=redact(f"{type(exc).__name__}: {exc}"))
        if self.sink is not None and not job.abandoned:
            try:
                await self.sink.write(result)
            except Exception as exc:
                # The answer is kept in the result (its body), but the caller must know it missed the sink.
                c.internal_errors += 1
                log.error("sink_failed", custom_id=job.custom_id, error=redact(f"{type(exc).__name__}: {exc}"),
                          traceback=traceback_text(exc))
                if result.ok:
                    c.succeeded -= 1
                    c.failed += 1
                result = dataclasses.replace(result, error=ErrorInfo(
                    errors.InternalError.code, redact(f"the result could not be written to the sink: "
                                                      f"{type(exc).__name__}: {exc}")))
        if job.stream_to is not None:
            job.stream_to.close()
        if job.future is not None and not job.future.done():
            job.future.set_result(result)
        elif job.deliver is not None:
            job.deliver.deliver(result)
        if job.cache_key is not None:
            for follower in self._flights.land(job):
                await self._finish(follower, dataclasses.replace(
                    result, custom_id=follower.custom_id, attempts=0,
                    latency_s=self._clock.now() - follower.submitted_at,
                    cost_usd=0.0 if result.ok else None, cached=result.ok,
                ))
                if result.ok:
                    c.cache_saved_usd += saved_usd or 0.0
        self._outstanding_done()

    def _outstanding_done(self) -> None:
        if not self._live and self._idle is not None:
            self._idle.set()

    def _spawn(self, coroutine: Any) -> None:
        """Run a settling coroutine from a callback; the pool waits for it before closing."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _limit_scope(client: Any, model: str | None) -> str:
    """What one shared budget is: base URL, a fingerprint of the key (never the key itself), and model."""
    key = str(getattr(client, "api_key", "") or "")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{getattr(client, 'base_url', '')}|{fingerprint}|{model or ''}"


def _too_large(job: Job, tpm: int) -> str:
    return f"the request needs about {job.estimate} tokens, more than the whole limit of {tpm} TPM"


def _describe(response: Response) -> str:
    body = response.body
    message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    detail = f": {str(message)[:300]}" if message else ""
    return redact(f"HTTP {response.status}{detail}")


def _limit_kind(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        kind = body["error"].get("type")
        if kind in ("requests", "tokens"):
            return str(kind)
    return None
