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
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from . import errors
from ._attempts import Attempts, FlexFallback
from ._budget import Budget
from ._dispatch import Dispatcher
from ._flights import Flights, ResponseCache
from ._intake import Intake
from ._job import Job, State
from ._map import MapCollector
from ._settle import Settler
from ._shape import Shaping, trim_policy
from .admission import Limiter
from .cache import CacheBackend, MemoryCache, open_cache
from .clock import Clock, LoopClock
from .coalesce import EMBEDDINGS, Coalescing
from .cost import ModelPrice, PriceTable
from .endpoints import Endpoint, Router, endpoint_states
from .fallbacks import Fallback
from .limits import Limits
from .logs import redact, register_secret, traceback_text
from .queue import JobQueue
from .requests import Request, build_body
from .results import Result
from .retry import Backoff
from .sinks import Sink
from .statistics import Counters, EndpointStatistics, PoolStatistics, RateMeter, ScopeStatistics
from .streaming import PoolStream, stream_channel
from .structured import wants_parsing
from .tokens import TokenEstimator
from .transport import OpenAITransport, Transport
from .trim import ContextWindow, ContextWindows, TrimPolicy

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream
    from openai import AsyncOpenAI

__all__ = ["Pool"]

log = structlog.get_logger("scheduler")

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
        flex_timeout_s: timeout of one attempt of a flex request (``service_tier="flex"``): flex answers slowly,
            and OpenAI suggests allowing up to 15 minutes.
        flex_fallback: ``"standard"`` sends a flex request that met a 429 for missing capacity once more at once
            at the standard tier (``service_tier="default"``, standard prices) instead of retrying it on flex after
            a backoff (None, the default). Either way such a 429 is not a rate limit: dispatch does not pause.
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
        context_windows: context windows by model name (a :class:`~scheduler.ContextWindow` or a number of
            tokens), adding to or overriding the built-in table (:data:`scheduler.trim.DEFAULT_WINDOWS`). A
            request that cannot fit its model's window fails at once with RequestTooLarge instead of being sent;
            models in neither are not checked. A :class:`~scheduler.trim.ContextWindows` replaces the table.
        trim: the default of ``submit(trim=...)``: True (or a :class:`~scheduler.TrimPolicy`) drops a chat's
            oldest messages until it fits its window (never system or developer messages, never the last user
            message); ``result.trimmed`` counts them.
        parse_retries: how many times an answer that does not parse into its ``response_format`` model is asked
            again before the job fails with OutputInvalid (a parse retry uses no attempt of ``max_attempts``).
        limiter: the admission seam (:class:`~scheduler.admission.Limiter`): its limits and store replace
            ``limits``, ``model_limits`` and ``redis``.
        estimator: the token estimator (:class:`~scheduler.tokens.TokenEstimator` or a subclass).
        coalesce: send one-text embeddings jobs queued together as one request (default: on; a
            :class:`~scheduler.coalesce.Coalescing` sets its bounds; False sends each alone).
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
        flex_timeout_s: float = 900.0,
        flex_fallback: FlexFallback | None = None,
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
        context_windows: ContextWindows | Mapping[str, ContextWindow | int] | None = None,
        trim: bool | TrimPolicy | None = None,
        parse_retries: int = 1,
        limiter: Limiter | None = None,
        estimator: TokenEstimator | None = None,
        coalesce: bool | Coalescing = True,
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
        if not request_timeout_s > 0 or not flex_timeout_s > 0:
            raise errors.ConfigurationError("request_timeout_s and flex_timeout_s must be positive")
        if flex_fallback not in (None, "standard"):
            raise errors.ConfigurationError(f"flex_fallback must be 'standard' or None, got {flex_fallback!r}")
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
        self._coalescing = Coalescing() if coalesce is True else coalesce or None
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
        states = endpoint_states(endpoints, chain, limits=self._limiter.limits,
                                 model_limits=self._limiter.model_limits, workers=workers)
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
        self._counters = Counters()
        self._meter = RateMeter()
        self._settler = Settler(clock=self._clock, counters=self._counters, sink=sink, flights=self._flights,
                                budget=self._budget, requeue=self._queue.requeue, budget_freed=self._budget_freed)
        self._dispatcher = Dispatcher(
            queue=self._queue, workers=workers, clock=self._clock, settler=self._settler, budget=self._budget,
            counters=self._counters, meter=self._meter, router=self._router, launch=self._launch,
            max_pause_s=max_pause_s, coalescing=self._coalescing,
        )
        self._intake = Intake(
            estimator=self.estimator, windows=ContextWindows.load(context_windows),
            shaping=Shaping(trim_policy(trim), parse_retries), budget=self._budget, cache=self._cache,
            cache_scope=self._cache_scope, flights=self._flights, coalescing=self._coalescing, clock=self._clock,
            queue=self._queue, settler=self._settler, dispatcher=self._dispatcher, router=self._router,
            counters=self._counters, check_running=self._check_running,
        )
        self._attempts = Attempts(
            dispatcher=self._dispatcher, settler=self._settler, router=self._router, fallbacks=chain,
            counters=self._counters, clock=self._clock, rng=rng or random.Random(), backoff=backoff or Backoff(),
            prices=self.prices, cache=self._cache, flights=self._flights, cache_scope=self._cache_scope,
            max_attempts=max_attempts, max_rate_limited_s=max_rate_limited_s, request_timeout_s=request_timeout_s,
            flex_timeout_s=flex_timeout_s, flex_fallback=flex_fallback,
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
            # A job riding in a combined request is in flight when its carrier is.
            running = job.carrier if job.state is State.RIDING and job.carrier is not None else job
            if running.state is State.RUNNING and running.task is not None:
                running.stop_reason = "closing"
                running.task.cancel()
        for job in live:
            running = job.carrier if job.state is State.RIDING and job.carrier is not None else job
            if running.state is not State.RUNNING:
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
        trim: bool | TrimPolicy | None = None,
        parse_retries: int | None = None,
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
            trim: drop the chat's oldest messages until it fits the model's context window: True, a
                :class:`~scheduler.TrimPolicy`, or False (None: the pool's ``trim``).
            parse_retries: for a ``response_format`` model, how many times an answer that does not parse is
                asked again (None: the pool's ``parse_retries``).
            **body: request body fields, e.g. ``max_tokens=200, temperature=0``; ``response_format`` may be a
                pydantic model class: the answer is parsed into ``result.parsed`` (see
                :mod:`scheduler.structured`).

        Raises:
            JobError: the job failed (a subclass says why); ``exc.result`` is its error Result.
            PoolClosed: the pool is not running.
            ConfigurationError: the request cannot be built.
        """
        self._check_running()
        if self._queue.full:
            # Wait for room before making the job: thousands of submitters may wait at once, and each then holds
            # only its arguments (the collector has less to scan; the full queue is the backpressure).
            await self._queue.wait_for_room()
        endpoint, full_body = build_body(request, endpoint, body, self.model)
        shaping = self._intake.shaping
        if trim is not None or parse_retries is not None:
            shaping = Shaping(shaping.trim if trim is None else trim_policy(trim),
                              shaping.parse_retries if parse_retries is None else parse_retries)
        # Made and queued without awaiting in the common case: submit() is the hot path of services.
        job = (self._intake.job_now(endpoint, full_body, custom_id, priority, timeout_s, cache, shaping)
               or await self._intake.new_job(endpoint, full_body, custom_id, priority, timeout_s, cache, shaping))
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        job.future = future
        if not self._intake.enqueue_now(job):
            await self._intake.enqueue(job)
        try:
            # Not shielded: cancelling the caller abandons the job (a request in flight is cancelled too).
            result = await future
        except asyncio.CancelledError:
            self._dispatcher.abandon(job)
            raise
        if raise_errors and result.error is not None:
            raise errors.error_for(result)
        return result

    async def embed(
        self, texts: Sequence[str], *, model: str | None = None, priority: int = 0, timeout_s: float | None = None,
        **body: Any,
    ) -> list[Any]:
        """Embed every text; returns their vectors in the order of ``texts``.

        Each text is a job of its own (with its own retries and limits); queued together, they go out as few
        requests as the coalescing bounds allow (see ``Pool(coalesce=...)``).

        Args:
            texts: the texts.
            model: the embeddings model (default: the pool's).
            priority, timeout_s: as for :meth:`submit`, for each text.
            **body: other request fields, e.g. ``dimensions=256``.

        Raises:
            JobError: a text's job failed (the first failure, once every text has settled).
            ConfigurationError: no model is named.
        """
        model = model or self.model
        if model is None:
            raise errors.ConfigurationError("embed() needs a model: Pool(model=...) or embed(texts, model=...)")
        results = await asyncio.gather(*(
            self.submit({**body, "model": model, "input": text}, endpoint=EMBEDDINGS, priority=priority,
                        timeout_s=timeout_s, raise_errors=False)
            for text in texts))
        for result in results:
            if result.error is not None:
                raise errors.error_for(result)
        return [result.body["data"][0]["embedding"] for result in results]

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
        if wants_parsing(full_body):
            raise errors.ConfigurationError("stream() does not parse structured outputs: use submit() for "
                                            "response_format=<a model class>")
        options = dict(full_body.get("stream_options") or {})
        options["include_usage"] = True
        full_body = {**full_body, "stream": True, "stream_options": options}

        async def start() -> tuple[Job, MemoryObjectReceiveStream[str]]:
            job = await self._intake.new_job(endpoint, full_body, custom_id, priority, timeout_s, False)
            job.stream_to, receive = stream_channel()
            job.future = asyncio.get_running_loop().create_future()
            await self._intake.enqueue(job)
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
                job = await self._intake.new_job(endpoint, body, item.custom_id, item.priority, item.timeout_s,
                                          item.cacheable)
            else:
                endpoint, body = build_body(item, None, extra, self.model)
                job = await self._intake.new_job(endpoint, body, None, 0, None)
            job.deliver = collector
            collector.pending += 1
            try:
                await self._intake.enqueue(job)
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
            internal_errors=c.internal_errors, coalesced_requests=c.coalesced_requests,
            coalesced_jobs=c.coalesced_jobs, capacity_refused=c.capacity_refused, flex_fallbacks=c.flex_fallbacks,
            parse_retries=c.parse_retries, trimmed_jobs=c.trimmed,
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

    def _launch(self, job: Job) -> None:
        self._attempts.launch(job)

    def _budget_freed(self) -> None:
        self._dispatcher.budget_freed()


def _lane(job: Job) -> tuple[int, str | None]:
    return job.route, job.model

