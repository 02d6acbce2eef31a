"""Test helpers: a virtual clock and an in-process transport that can produce every fault, for testing code that
uses the pool.

``FakeClock`` runs the pool in virtual time: when every task is blocked, it jumps to the next sleeper's or
timer's deadline, so a test that "waits a minute" for the rate limits finishes at once, with exact times.
``FakeTransport`` answers each request from a handler or a script, with no network. Answers are built with
:func:`ok`, :func:`error`, :func:`rate_limited`, :func:`html` (a proxy's HTML page), :func:`wrong_shape` (JSON
that is not the endpoint's answer) and :func:`streamed` (a streamed answer that can break off in each of the
ways a real stream does); an exception (e.g. ``TransportFailure("connection", "reset")``) is raised as the
attempt's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .transport import Response, StreamResponse, TransportFailure

__all__ = [
    "FakeClock",
    "FakeTransport",
    "Streamed",
    "TransportFailure",
    "answer_for",
    "error",
    "html",
    "ok",
    "rate_limited",
    "streamed",
    "wrong_shape",
]


class _FakeTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Virtual time. Use ``async with clock.autojump():`` around the code under test.

    ``wall()`` is the wall clock on the same time line: ``wall_start`` (a Unix time; the default is the turn of
    a minute) when ``now()`` reads ``start``. Give a mock server ``clock=fake.wall`` to run both on it.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._counter = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall_offset + self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_at(self._now + seconds, lambda: _resolve(waiter))
        await waiter

    def call_at(self, when: float, callback: Callable[[], object]) -> _FakeTimer:
        """Run ``callback()`` once the clock reaches ``when``."""
        timer = _FakeTimer(callback)
        heapq.heappush(self._timers, (when, next(self._counter), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward and run every timer (wake every sleeper) whose time has come."""
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    @contextlib.asynccontextmanager
    async def autojump(self) -> AsyncIterator[FakeClock]:
        """While inside, jump to the next deadline whenever all other tasks are blocked."""
        task = asyncio.ensure_future(self._jump_when_idle())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _jump_when_idle(self) -> None:
        while True:
            await asyncio.sleep(0)
            if not _all_other_tasks_blocked():
                continue
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if self._timers:
                self.advance(max(0.0, self._timers[0][0] - self._now))
            else:
                await asyncio.sleep(0.001)  # blocked on something else than time: real I/O, a thread


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _all_other_tasks_blocked() -> bool:
    this = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is this:
            continue
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if waiter is None or waiter.done():
            return False
    return True


@dataclass(frozen=True, slots=True)
class Streamed:
    """A streamed chat answer: its text deltas, then how it ends (see :func:`streamed`)."""

    deltas: Iterable[str] | AsyncIterable[str]
    finish_reason: str = "stop"
    fault: Literal["cut", "truncated", "error"] | None = None
    #: deltas delivered before the fault
    after: int = 0
    usage: Mapping[str, int] = field(default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 5,
                                                              "total_tokens": 15})
    headers: Mapping[str, str] = field(default_factory=dict)


def streamed(
    deltas: Iterable[str] | AsyncIterable[str], *, finish_reason: str = "stop",
    fault: Literal["cut", "truncated", "error"] | None = None, after: int = 0,
    headers: Mapping[str, str] | None = None,
) -> Streamed:
    """A streamed answer for :class:`FakeTransport` (as ``ok(text)`` for ``send``, it stands for a whole answer).

    ``fault`` breaks it off after ``after`` deltas: ``"cut"`` the connection drops, ``"truncated"`` the stream
    ends cleanly without a finish reason (no ``[DONE]``), ``"error"`` an SSE error event arrives.
    """
    return Streamed(deltas, finish_reason, fault, after, headers=dict(headers or {}))


Answer = Response | Streamed | Exception
Handler = Callable[[str, Mapping[str, Any]], "Answer | Awaitable[Answer]"]


class FakeTransport:
    """Answers from ``handler(endpoint, body)`` or, in turn, from ``script`` (then :func:`answer_for` the endpoint
    once it runs out).

    A handler or script item may be an exception (e.g. ``TransportFailure("connection", "reset")``) to raise, or
    a :func:`streamed` answer. ``calls`` records ``(endpoint, body)`` of every attempt, and ``sent_at`` its time
    on ``clock``.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        script: Iterable[Response | Streamed | Exception] = (),
        clock: Any = None,
    ) -> None:
        self._handler = handler
        self._script = list(script)
        self._clock = clock
        self.calls: list[tuple[str, Mapping[str, Any]]] = []
        self.sent_at: list[float] = []

    async def _answer(self, endpoint: str, body: Mapping[str, Any]) -> Response | Streamed:
        self.calls.append((endpoint, body))
        if self._clock is not None:
            self.sent_at.append(self._clock.now())
        answer: Any
        if self._handler is not None:
            answer = self._handler(endpoint, body)
            if inspect.isawaitable(answer):
                answer = await answer
        elif self._script:
            answer = self._script.pop(0)
        else:
            answer = answer_for(endpoint)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response:
        answer = await self._answer(endpoint, body)
        if isinstance(answer, Streamed):
            return ok(await _join(answer.deltas), finish_reason=answer.finish_reason, headers=answer.headers)
        return answer

    @contextlib.asynccontextmanager
    async def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> AsyncIterator[StreamResponse]:
        answer = await self._answer(endpoint, body)
        if isinstance(answer, Response):
            if answer.status != 200:
                yield StreamResponse(answer.status, answer.headers, answer.body, _no_events(), answer.request_id)
                return
            message = answer.body["choices"][0]["message"]["content"]
            answer = Streamed([word + " " for word in message.split(" ")],
                              answer.body["choices"][0]["finish_reason"], headers=answer.headers,
                              usage=answer.body.get("usage") or {})
        yield StreamResponse(200, answer.headers, None, _events(answer, body), "req_fake")


async def _no_events() -> AsyncIterator[dict[str, Any]]:
    return
    yield  # an empty async generator


async def _join(deltas: Iterable[str] | AsyncIterable[str]) -> str:
    if isinstance(deltas, AsyncIterable):
        return "".join([delta async for delta in deltas])
    return "".join(deltas)


async def _events(answer: Streamed, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """SSE chunks as the SDK yields them, breaking off as ``answer.fault`` says."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    async def deltas() -> AsyncGenerator[str, None]:
        if isinstance(answer.deltas, AsyncIterable):
            async for delta in answer.deltas:
                yield delta
        else:
            for delta in answer.deltas:
                yield delta

    sent = 0
    source = deltas()
    try:
        async for delta in source:
            if answer.fault is not None and sent == answer.after:
                break
            yield chunk({"content": delta}, None)
            sent += 1
    finally:
        await source.aclose()
    if answer.fault == "cut":
        raise TransportFailure("connection", "the stream was cut off")
    if answer.fault == "error":
        raise TransportFailure("stream_error", "the server sent an error event: overloaded")
    if answer.fault == "truncated":
        return
    yield chunk({}, answer.finish_reason)
    yield {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": dict(answer.usage)}


def ok(
    text: str = "ok", *, prompt_tokens: int = 10, completion_tokens: int = 5, finish_reason: str = "stop",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A 200 chat completion."""
    body = {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return Response(200, dict(headers or {}), body, "req_fake")


def answer_for(endpoint: str, text: str = "ok") -> Response:
    """A 200 of the endpoint's own shape: a chat completion, an embeddings list, a Responses API response."""
    if endpoint.endswith("embeddings"):
        body: dict[str, Any] = {"object": "list", "model": "fake",
                                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 1.0]}],
                                "usage": {"prompt_tokens": 3, "total_tokens": 3}}
        return Response(200, {}, body, "req_fake")
    if endpoint.endswith("responses"):
        body = {"id": "resp_fake", "object": "response", "status": "completed", "model": "fake",
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": text}]}],
                "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}}
        return Response(200, {}, body, "req_fake")
    return ok(text)


def error(
    status: int, code: str | None = None, message: str = "error", *, headers: Mapping[str, str] | None = None,
    kind: str | None = None,
) -> Response:
    """An OpenAI error answer."""
    body = {"error": {"message": message, "type": kind or "server_error", "param": None, "code": code}}
    return Response(status, dict(headers or {}), body, "req_fake")


def rate_limited(retry_after: float | None = None, *, kind: str = "requests") -> Response:
    """A 429 rate_limit_exceeded, with ``retry-after`` in seconds when given."""
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
    return error(429, "rate_limit_exceeded", "Rate limit reached", headers=headers, kind=kind)


def html(status: int = 200) -> Response:
    """An HTML page where the API's JSON should be, as a misconfigured proxy or captive portal answers."""
    page = "<html><head><title>Gateway</title></head><body>Please sign in</body></html>"
    return Response.from_bytes(status, {"content-type": "text/html"}, page.encode())


def wrong_shape(status: int = 200) -> Response:
    """Valid JSON that is not the endpoint's answer (a health check, another API's body)."""
    return Response(status, {"content-type": "application/json"}, {"status": "ok"}, None)
