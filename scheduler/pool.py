"""The pool: a priority queue, one dispatcher that admits jobs through the limiter, and N workers.

::

    submit()/map() ──► JobQueue ──► dispatcher ──(limiter: RPM + TPM)──► worker ──► Transport ──► API
                          ▲                                                │
                          └────── requeue after backoff ◄── classify ◄─────┴──► Sink, caller
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import structlog

from . import errors
from .clock import Clock, LoopClock
from .limits import ClockedLimiter, Limiter, Limits
from .logs import redact, register_secret
from .queue import JobQueue
from .results import ErrorInfo, Result, Usage
from .retry import Backoff, Outcome, classify, error_code, retry_after_s
from .sinks import Sink
from .tokens import TokenEstimator
from .transport import OpenAITransport, Response, Transport, TransportFailure

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["Pool", "PoolStatistics", "PoolStream", "Request"]

log = structlog.get_logger("scheduler")

CHAT = "/v1/chat/completions"
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
class Request:
    """One request with its scheduling attributes, for :meth:`Pool.map` (``submit`` takes them as keywords)."""

    body: Mapping[str, Any]
    endpoint: str = CHAT
    custom_id: str | None = None
    #: lower runs first
    priority: int = 0
    #: seconds from submission until the job fails with DeadlineExceeded
    timeout_s: float | None = None


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
    cost_usd: float
    #: why admission stopped, if it did
    stopped: str | None


class _Job:
    __slots__ = (
        "attempts",
        "body",
        "cancelled",
        "charged",
        "custom_id",
        "deadline",
        "deliver",
        "endpoint",
        "estimate",
        "future",
        "priority",
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
        if transport is None:
            if client is None:
                from openai import AsyncOpenAI

                client = AsyncOpenAI()
            register_secret(getattr(client, "api_key", None))
            transport = OpenAITransport(client)
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

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pool:
        if self.model is not None:
            # Loading an encoding takes a few hundred milliseconds: not on the event loop, not at the first submit.
            await anyio.to_thread.run_sync(TokenEstimator.preload, self.model)
        if self._limiter is None and self._redis_url is not None:
            from .redis_limiter import RedisLimiter

            assert self._limits is not None
            self._limiter = await RedisLimiter.connect(self._redis_url, self._limits, scope=self._limit_scope)
        if self._limiter is None:
            self._limiter = ClockedLimiter(self._limits, self._clock)
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
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(exc_type, exc, tb)
            self._task_group = None
            if self.sink is not None:
                await self.sink.aclose()
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
            **body: request body fields, e.g. ``max_tokens=200, temperature=0``.

        Raises:
            JobError: the job failed (a subclass says why); ``exc.result`` is its error Result.
            PoolClosed: the pool is not running.
            ConfigurationError: the request cannot be built.
        """
        endpoint, full_body = self._build_body(request, endpoint, body)
        job = await self._new_job(endpoint, full_body, custom_id, priority, timeout_s)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        job.future = future
        await self._enqueue(job)
        try:
            result = await asyncio.shield(future)
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

    async def map(
        self, requests: Iterable[Request | str | Mapping[str, Any]] | AsyncIterable[Request | str | Mapping[str, Any]],
        *, buffer: int = 256,
    ) -> AsyncIterator[Result]:
        """Run many requests and yield their results (errors included) as they complete.

        Memory stays bounded however many requests come in: they are read from ``requests`` only as the queue
        has room, and a consumer that falls ``buffer`` results behind slows the workers down.
        """
        send, receive = anyio.create_memory_object_stream[Result](buffer)
        collector = _MapCollector(send)
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
            async with receive:
                async for result in receive:
                    yield result
        finally:
            scope.cancel()
        if failure:
            raise failure[0]

    async def _feed_one(self, item: Request | str | Mapping[str, Any], collector: _MapCollector) -> None:
        if isinstance(item, Request):
            endpoint, body = self._build_body(item.body, item.endpoint, {})
            job = await self._new_job(endpoint, body, item.custom_id, item.priority, item.timeout_s)
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
        )

    def stop(self, reason: str = "stopped by the caller") -> None:
        """Stop admitting: queued and later jobs fail with RunStopped; in-flight jobs finish."""
        self._stop(errors.RunStopped(reason))

    # ------------------------------------------------------------------ building jobs

    def _build_body(
        self, request: str | Sequence[Mapping[str, Any]] | Mapping[str, Any], endpoint: str | None,
        extra: Mapping[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        if isinstance(request, str):
            body: dict[str, Any] = {"messages": [{"role": "user", "content": request}]}
        elif isinstance(request, Mapping):
            body = dict(request)
        elif isinstance(request, Sequence):
            body = {"messages": list(request)}
        else:
            raise errors.ConfigurationError(
                f"a request is a prompt string, a list of messages or a body dict, not {type(request).__name__}"
            )
        body.update(extra)
        if "model" not in body:
            if self.model is None:
                raise errors.ConfigurationError("no model: pass model= to Pool or put 'model' in the request body")
            body["model"] = self.model
        if endpoint is None:
            endpoint = _infer_endpoint(body)
        return endpoint, body

    async def _new_job(
        self, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int, timeout_s: float | None,
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
        return _Job(
            endpoint, body, custom_id if custom_id is not None else f"request-{sequence}",
            priority, sequence, estimate, now, deadline,
        )

    async def _enqueue(self, job: _Job) -> None:
        self._submitted += 1
        self._outstanding += 1
        assert self._idle is not None
        self._idle.clear()
        limits = self._limiter.snapshot() if self._limiter is not None else None
        if self._stopped is not None:
            await self._fail(job, type(self._stopped), str(self._stopped))
        elif limits is not None and limits.tpm is not None and job.estimate > limits.tpm:
            await self._fail(
                job, errors.RequestTooLarge,
                f"the request needs about {job.estimate} tokens, more than the whole limit of {limits.tpm} TPM",
            )
        else:
            try:
                await self._queue.put(job)
            except BaseException:
                # Cancelled while waiting for room: the job never entered the queue.
                self._submitted -= 1
                self._settle()
                raise

    # ------------------------------------------------------------------ dispatching

    def _running(self) -> anyio.abc.TaskGroup:
        if self._task_group is None:
            raise errors.PoolClosed("the pool is not running: use it inside 'async with Pool(...)'")
        return self._task_group

    async def _dispatch(self) -> None:
        """The only consumer of the queue: admits jobs in priority order as workers and limits allow."""
        queue, slots, tg = self._queue, self._slots, self._running()
        assert slots is not None
        while True:
            if not queue:
                await queue.wait_nonempty()
            await slots.acquire()
            job: _Job | None = queue.pop()
            try:
                job = await self._admit(job)
            except BaseException:
                slots.release()
                raise
            if job is None:
                slots.release()
                continue
            self._in_flight += 1
            tg.start_soon(self._run, job)

    async def _admit(self, job: _Job) -> _Job | None:
        """Wait until ``job`` (or a job that overtook it in priority meanwhile) fits the limits; charge it."""
        clock, limiter, queue = self._clock, self._limiter, self._queue
        assert limiter is not None
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
            if self._pause_until > now:
                await clock.sleep(self._pause_until - now)
            else:
                job.charged = limiter.scale(job.estimate)
                wait = await limiter.acquire(job.charged)
                if wait == 0.0:
                    job.attempts += 1
                    self._charged_tokens += job.charged
                    self._meter.add(now, job.charged)
                    return job
                await clock.sleep(wait)
            head = queue.head()
            if head is not None and (head.priority, head.sequence) < (job.priority, job.sequence):
                queue.requeue(job)
                job = queue.pop()

    # ------------------------------------------------------------------ running a job

    async def _run(self, job: _Job) -> None:
        """One attempt of an admitted job, then its result or its retry."""
        limiter, clock, slots = self._limiter, self._clock, self._slots
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
                    response, streamed = await self._stream_attempt(job)
                else:
                    response = await self._transport.send(job.endpoint, job.body, timeout=self._timeout(job))
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
            await self._succeed(job, response)
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

    async def _stream_attempt(self, job: _Job) -> tuple[Response, bool]:
        """Relay a streamed answer's deltas; returns the assembled body as a Response."""
        assert job.stream_to is not None
        delivered = False
        async with self._transport.stream(job.endpoint, job.body, timeout=self._timeout(job)) as answer:
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
            log.warning("dispatch_paused", delay_s=round(delay, 3), reason="rate_limited")

    def _stop(self, error: errors.RunStopped) -> None:
        if self._stopped is None:
            self._stopped = error
            log.error("run_stopped", reason=str(error), code=error.code)

    async def _retry_or_fail(
        self, job: _Job, response: Response | None, delay: float | None, reason: str, streamed: bool
    ) -> None:
        if streamed:
            await self._fail(job, errors.RetriesExhausted, f"the stream failed after output began: {reason}", response)
            return
        if job.attempts >= self.max_attempts:
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

    # ------------------------------------------------------------------ finishing

    async def _succeed(self, job: _Job, response: Response) -> None:
        usage = Usage.from_body(response.body)
        limits = self._limiter.snapshot() if self._limiter is not None else None
        if usage is not None:
            self._prompt_tokens += usage.prompt_tokens
            self._completion_tokens += usage.completion_tokens
            if limits is not None and limits.refund_unused and self._limiter is not None:
                unused = job.charged - usage.total_tokens
                if unused > 0:
                    await self._limiter.refund(unused)
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=response.status, body=response.body,
            request_id=response.request_id, usage=usage, attempts=job.attempts,
            latency_s=self._clock.now() - job.submitted_at, model=_str_or_none(job.body.get("model")),
        )
        if result.truncated:
            self._truncated += 1
        self._succeeded += 1
        await self._finish(job, result)

    async def _fail(
        self, job: _Job, kind: type[errors.JobError], message: str, response: Response | None = None
    ) -> None:
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

    async def _drop_cancelled(self, job: _Job) -> None:
        # The submitter went away: nobody waits for this result, and no request is sent.
        self._settle()

    async def _finish(self, job: _Job, result: Result) -> None:
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
    """Delivers map() results to its stream, and closes the stream after the last one."""

    __slots__ = ("_done_feeding", "_send", "pending")

    def __init__(self, send: anyio.abc.ObjectSendStream[Result]) -> None:
        self._send = send
        self.pending = 0
        self._done_feeding = False

    async def deliver(self, result: Result) -> None:
        self.pending -= 1
        try:
            await self._send.send(result)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the consumer stopped reading: the result still went to the sink
        self._maybe_close()

    def feeding_done(self) -> None:
        self._done_feeding = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._done_feeding and self.pending == 0:
            self._send.close()


class PoolStream:
    """The text deltas of a streamed job (async iterator); ``result`` holds the whole Result afterwards."""

    def __init__(
        self, pool: Pool, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int,
        timeout_s: float | None,
    ) -> None:
        self._pool = pool
        self._args = (endpoint, body, custom_id, priority, timeout_s)
        self._receive: anyio.abc.ObjectReceiveStream[str] | None = None
        self._future: asyncio.Future[Result] | None = None
        #: the job's Result, once the stream has ended
        self.result: Result | None = None

    def __aiter__(self) -> PoolStream:
        return self

    async def __anext__(self) -> str:
        if self._receive is None:
            job = await self._pool._new_job(*self._args)
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


def _infer_endpoint(body: Mapping[str, Any]) -> str:
    if "messages" in body:
        return CHAT
    if "input" in body:
        model = str(body.get("model", ""))
        return "/v1/embeddings" if "embed" in model else "/v1/responses"
    if "prompt" in body:
        return "/v1/completions"
    raise errors.ConfigurationError("cannot tell the endpoint of a body without 'messages': pass endpoint=")


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
