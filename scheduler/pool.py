"""The pool: the public face of the scheduler, composing its parts.

::

    submit()/map()/stream() ──► JobQueue ──► Dispatcher ──(limit scope: RPM/TPM; budget)──► Attempts ──► Transport
            (requests.py)          │          (_dispatch.py)   (admission/)  (_budget.py)     (_attempts.py)
                                   ▲                                                             │
                                   └──────── requeue after backoff ◄── classify the answer ◄─────┤
                                                                                                 ▼
                                          Settler: the result to the sink, the caller, identical jobs (_settle.py)

Every job settles exactly once (a result or a typed error) whatever happens on its path: an unexpected exception
becomes an ``internal_error`` result, a deadline fails the job wherever it waits, and leaving ``async with``
settles every job still pending before the caller's own exception goes on, as itself.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import errors
from ._attempts import Attempts
from ._budget import Budget, cap_output
from ._dispatch import Dispatcher, too_large
from ._flights import Flights, ResponseCache
from ._job import Job, State
from ._map import MapCollector
from ._settle import Settler
from .admission import Limiter
from .cache import CacheBackend, MemoryCache, cache_key, is_deterministic, open_cache
from .clock import Clock, LoopClock
from .cost import ModelPrice, PriceTable
from .endpoints import Endpoint, EndpointState, Router
from .fallbacks import Fallback
from .limits import Limits
from .logs import redact, register_secret, traceback_text
from .queue import JobQueue
from .requests import Request, build_body
from .results import Result, Usage
from .retry import Backoff
from .sinks import Sink
from .statistics import Counters, EndpointStatistics, PoolStatistics, RateMeter, ScopeStatistics
from .streaming import PoolStream, stream_channel
from .tokens import TokenEstimator, output_reservation
from .transport import OpenAITransport, Transport

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
        limits: the rate limits of every model (each model has its own buckets, as OpenAI limits each model
            separately); ``None`` learns them from the response headers (one request at a time until an answer
            carries them).
        model_limits: limits of particular models, overriding ``limits`` for them.
        workers: the most requests in flight at once.
        max_attempts: attempts per job that may fail (5xx, timeouts, dropped connections, invalid answers),
            counting the first. 429s do not count: they are bounded by ``max_rate_limited_s``.
        backoff: the jittered exponential backoff between retries.
        request_timeout_s: timeout of one HTTP attempt.
        queue_size: jobs queued before ``submit`` waits (backpressure).
        sink: receives every result (e.g. :class:`~scheduler.JsonlSink`).
        default_max_tokens: output reservation charged for requests without an output cap (under a budget it
            is also sent as the request's cap, so the worst case held is the worst case possible).
        redis: a Redis URL: the buckets live there, shared by every pool that uses the same endpoint, key and
            model (requires ``limits``).
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
        endpoints: several keys, deployments or servers as one pool (:class:`~scheduler.Endpoint`: a client,
            its limits, the models it serves, a weight); each job goes to the endpoint that can admit it
            soonest. Instead of ``client``; ``limits`` and ``model_limits`` serve endpoints that give none.
        max_pause_s: the longest a 429's ``retry-after`` pauses all dispatch (a longer ask is capped, with a
            warning).
        max_rate_limited_s: how long a job may keep meeting 429s before it fails (RetriesExhausted).
        limiter: the admission seam (:class:`~scheduler.admission.Limiter`): its limits and store replace
            ``limits``, ``model_limits`` and ``redis``.
        estimator: the token estimator (:class:`~scheduler.tokens.TokenEstimator` or a subclass).
        transport, clock, rng: seams for tests.
    """

    def __init__(
        self,
        client: AsyncOpenAI | None = None,
        *,
        model: str | None = None,
        limits: Limits | None = None,
        model_limits: Mapping[str, Limits] | None = None,
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
        endpoints: Sequence[Endpoint] = (),
        max_pause_s: float = 60.0,
        max_rate_limited_s: float = 600.0,
        limiter: Limiter | None = None,
        estimator: TokenEstimator | None = None,
        transport: Transport | None = None,
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
        if endpoints and (client is not None or transport is not None):
            raise errors.ConfigurationError("give either client= (one endpoint) or endpoints=, not both")
        if not endpoints:
            if transport is None:
                if client is None:
                    from openai import AsyncOpenAI

                    client = AsyncOpenAI()
                transport = OpenAITransport(client)
            endpoints = [Endpoint(client=client, transport=transport)]
        for endpoint in endpoints:
            register_secret(getattr(endpoint.client, "api_key", None))
        self.model = model
        self.workers = workers
        self.sink = sink
        #: the token estimator, a public seam (``Pool(estimator=...)``)
        self.estimator = estimator or TokenEstimator(default_max_tokens)
        self.prices = PriceTable.load(prices)
        self._clock: Clock = clock or LoopClock()
        chain = tuple(f if isinstance(f, Fallback) else Fallback(model=f) for f in fallbacks)
        self._budget: Budget | None = None
        if budget_usd is not None:
            self._budget = Budget(float(budget_usd), self.prices, self.estimator.default_output_tokens)
            for name in (model, *(f.model for f in chain)):
                if name is not None and not self._budget.priced(name):
                    raise errors.ConfigurationError(f"a budget needs a price for every model: none for {name!r}")
        model_limits = dict(model_limits or {})
        for fallback in chain:
            if fallback.limits is not None and fallback.client is None:
                model_limits.setdefault(fallback.model, fallback.limits)
        self._limiter = limiter or Limiter(limits, model_limits=model_limits, clock=self._clock)
        # A fallback on a client (or transport) of its own is served there, not by the pool's endpoints.
        elsewhere = frozenset(f.model for f in chain if f.client is not None or f.transport is not None)
        states = [EndpointState(e, e.transport or _transport(e), limits=self._limiter.limits,
                                model_limits=self._limiter.model_limits, workers=workers, excluded=elsewhere)
                  for e in endpoints]
        for fallback in chain:
            if fallback.client is not None:
                # A fallback on a client of its own is an endpoint serving that model only.
                register_secret(getattr(fallback.client, "api_key", None))
                own = Endpoint(client=fallback.client, limits=fallback.limits, models=[fallback.model],
                               transport=fallback.transport)
                states.append(EndpointState(own, fallback.transport or OpenAITransport(fallback.client),
                                            limits=fallback.limits, model_limits={}, workers=workers))
            elif fallback.transport is not None:
                states.append(EndpointState(Endpoint(transport=fallback.transport, models=[fallback.model],
                                                     limits=fallback.limits),
                                            fallback.transport, limits=fallback.limits, model_limits={},
                                            workers=workers))
        self._router = Router(states, self._limiter)
        self._redis_url = redis if limiter is None else None
        self._owned_cache: CacheBackend | None = None
        cache_backend: CacheBackend | None = None
        if cache is True:
            cache_backend = MemoryCache()
        elif isinstance(cache, str | os.PathLike):
            cache_backend = self._owned_cache = open_cache(cache)
        elif cache is not None and cache is not False:
            cache_backend = cache
        self._cache = ResponseCache(cache_backend) if cache_backend is not None else None
        # Answers differ between providers and organisations serving the same model name: the endpoints' base
        # URLs and key fingerprints scope every cache key.
        self._cache_scope = "+".join(sorted(state.key for state in states))
        self._flights = Flights()
        # One lane per limit scope (a route and a model): a model waiting for its limit holds back no other.
        self._queue: JobQueue[Job] = JobQueue(queue_size, lane=_lane)
        self._sequence = itertools.count()
        self._counters = Counters()
        self._meter = RateMeter()
        self._settler = Settler(clock=self._clock, counters=self._counters, sink=sink, flights=self._flights,
                                budget=self._budget, requeue=self._queue.requeue, budget_freed=self._budget_freed)
        self._dispatcher = Dispatcher(
            queue=self._queue, workers=workers, clock=self._clock, settler=self._settler, budget=self._budget,
            counters=self._counters, meter=self._meter, router=self._router, launch=self._launch,
            max_pause_s=max_pause_s,
        )
        self._attempts = Attempts(
            dispatcher=self._dispatcher, settler=self._settler, router=self._router, fallbacks=chain,
            counters=self._counters, clock=self._clock, rng=rng or random.Random(), backoff=backoff or Backoff(),
            prices=self.prices, cache=self._cache, flights=self._flights, cache_scope=self._cache_scope,
            max_attempts=max_attempts, max_rate_limited_s=max_rate_limited_s, request_timeout_s=request_timeout_s,
        )
        self._loop_task: asyncio.Task[None] | None = None
        self._feeders: set[asyncio.Task[None]] = set()
        self._fatal: BaseException | None = None
        self._running = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pool:
        if self.model is not None:
            # Loading an encoding takes a few hundred milliseconds: not on the event loop, not at the first submit.
            await anyio.to_thread.run_sync(TokenEstimator.preload, self.model)
        if self._redis_url is not None:
            from .admission.redis_store import RedisStore

            store = await RedisStore.connect(self._redis_url)
            self._limiter = Limiter(self._limiter.limits, model_limits=self._limiter.model_limits, store=store,
                                    clock=self._clock)
            self._router.limiter = self._limiter
        self._running = True
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatcher.run())
        self._loop_task.add_done_callback(self._dispatcher_done)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is None:
                # Drain: every submitted job finishes (or fails) before the pool closes.
                await self._settler.idle.wait()
        finally:
            # Shielded: leaving because of a cancellation, the pending jobs must still be settled and awaited.
            with anyio.CancelScope(shield=True):
                await self._close(exc_type)
        # The caller's own exception propagates as itself (this returns None); a bug of the pool's is raised.
        if self._fatal is not None and exc_type is None:
            raise self._fatal

    async def _close(self, exc_type: type[BaseException] | None) -> None:
        self._running = False
        why = "the pool closed" if exc_type is None else f"the pool closed on {exc_type.__name__}"
        live = list(self._settler.live)
        for job in live:
            if job.state is State.RUNNING and job.task is not None:
                job.stop_reason = "closing"
                job.task.cancel()
        for job in live:
            if job.state is not State.RUNNING:
                await self._settler.fail(job, errors.RunStopped, f"{why} before the job ran")
        for task in (self._loop_task, *self._feeders):
            if task is not None:
                task.cancel()
        while self._attempts.tasks or self._dispatcher.tasks:
            await asyncio.gather(*self._attempts.tasks, *self._dispatcher.tasks, return_exceptions=True)
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, *self._feeders, return_exceptions=True)
        await self._limiter.aclose()
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
        self._dispatcher.stop(errors.RunStopped(f"the pool's dispatcher failed ({type(exc).__name__}); see the log"))

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
            self._dispatcher.abandon(job)
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

        return PoolStream(start, self._dispatcher.abandon)

    def add_observer(self, observer: Callable[[Result], None]) -> None:
        """Call ``observer(result)`` for every result, as it is delivered (metrics use it). It must be quick,
        and what it raises is logged and ignored."""
        self._settler.observers.append(observer)

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
        c, budget = self._counters, self._budget
        rpm, tpm = self._meter.per_minute(self._clock.now())
        # The pool's model on the first endpoint serving it (statistics must not make a scope where none is used).
        serving = next((e for e in self._router.endpoints if e.serves(self.model)), None) if self.model else None
        primary = self._router.scope(serving, self.model) if serving is not None else None
        scopes = self._limiter.scopes()
        lead = primary or (scopes[0] if scopes else None)
        stopped = self._dispatcher.stopped
        names = {e.key: e.label for e in self._router.endpoints}
        return PoolStatistics(
            submitted=c.submitted, queued=len(self._queue), in_flight=c.in_flight, succeeded=c.succeeded,
            failed=c.failed, retries=c.retries, rate_limited=c.rate_limited, attempts=c.attempts,
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, charged_tokens=c.charged_tokens,
            requests_per_minute=rpm, tokens_per_minute=tpm,
            limits=lead.snapshot() if lead is not None else self._limiter.limits,
            token_ratio=lead.ratio if lead is not None else 1.0,
            truncated=c.truncated, cost_usd=c.cost_usd, stopped=str(stopped) if stopped is not None else None,
            budget_usd=budget.limit_usd if budget else None, reserved_usd=budget.reserved_usd if budget else 0.0,
            uncertain_usd=budget.uncertain_usd if budget else 0.0, cache_hits=c.cache_hits,
            cache_misses=c.cache_misses, cache_saved_usd=c.cache_saved_usd, fallbacks=c.fallbacks, pauses=c.pauses,
            internal_errors=c.internal_errors,
            scopes=tuple(ScopeStatistics(names.get(s.endpoint, s.endpoint.split("|")[0]), s.model_name,
                                         s.snapshot(), s.ratio) for s in scopes),
            endpoints=tuple(
                EndpointStatistics(e.label, e.served, e.failures, e.in_flight, e.breaker.state,
                                   str(e.retired) if e.retired is not None else None, e.dialect.dialect,
                                   e.concurrency.limit if e.concurrency is not None else None)
                for e in self._router.endpoints),
        )

    def stop(self, reason: str = "stopped by the caller") -> None:
        """Stop admitting: queued and later jobs fail with RunStopped; in-flight jobs finish."""
        self._dispatcher.stop(errors.RunStopped(reason))

    # ------------------------------------------------------------------ jobs

    def _check_running(self) -> None:
        if not self._running:
            raise errors.PoolClosed("the pool is not running: use it inside 'async with Pool(...)'")

    async def _new_job(
        self, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int, timeout_s: float | None,
        cacheable: bool | None = None,
    ) -> Job:
        self._check_running()
        estimator = self.estimator
        if self._budget is not None:
            # The reservation charged becomes the request's cap: the worst case held is the worst case possible.
            body = dict(cap_output(endpoint, body, estimator.default_output_tokens))
        if estimator.prompt_chars(endpoint, body) > _THREAD_ESTIMATE_CHARS:
            estimate = await anyio.to_thread.run_sync(estimator.estimate, endpoint, body)
        else:
            estimate = estimator.estimate(endpoint, body)
        sequence = next(self._sequence)
        now = self._clock.now()
        deadline = now + timeout_s if timeout_s is not None else None
        job = Job(endpoint, body, custom_id if custom_id is not None else f"request-{sequence}", priority,
                  sequence, estimate, output_reservation(endpoint, body, estimator.default_output_tokens), now,
                  deadline)
        if self._cache is not None and cacheable is not False and (cacheable or is_deterministic(endpoint, body)):
            job.cache_key = cache_key(self._cache_scope, endpoint, body)
        return job

    async def _enqueue(self, job: Job) -> None:
        settler = self._settler
        settler.register(job)
        if job.deadline is not None:
            job.deadline_timer = self._clock.call_at(job.deadline, functools.partial(self._dispatcher.expire, job))
        try:
            # A cached answer costs nothing and touches no limit: served even after the run stopped.
            if job.cache_key is not None and await self._answered_by_cache(job):
                return
            stopped = self._dispatcher.stopped
            if stopped is not None:
                await settler.fail(job, type(stopped), str(stopped))
            elif (tpm := self._router.too_large(job)) is not None:
                await settler.fail(job, errors.RequestTooLarge, too_large(job, tpm))
            elif self._budget is not None and not self._budget.priced(job.model):
                # Not a stop: this job cannot be accounted for; a rerun with its price (prices=) runs it.
                await settler.fail(job, errors.BudgetExhausted,
                                   f"no price is known for model {job.model!r}: under a budget every model needs one")
            else:
                await self._queue.put(job)
        except BaseException:
            if job.state is not State.SETTLED:
                # Cancelled while waiting for room: the job never entered the pool.
                self._counters.submitted -= 1
                settler.drop(job)
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
        await self._settler.finish(job, result, saved_usd=entry.cost_usd)
        return True


    def _launch(self, job: Job) -> None:
        self._attempts.launch(job)

    def _budget_freed(self) -> None:
        self._dispatcher.budget_freed()


def _lane(job: Job) -> tuple[int, str | None]:
    return job.route, job.model


def _transport(endpoint: Endpoint) -> Transport:
    assert endpoint.client is not None  # an Endpoint has a client or a transport
    return OpenAITransport(endpoint.client)
