"""Test helpers: a virtual clock and an in-process transport, for testing code that uses the pool.

``FakeClock`` runs the pool in virtual time: when every task is blocked, it jumps to the next sleeper's
deadline, so a test that "waits a minute" for the rate limits finishes at once, with exact times.
``FakeTransport`` answers each request from a handler or a script, with no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from .transport import Response, StreamResponse, TransportFailure

__all__ = ["FakeClock", "FakeTransport", "error", "ok", "rate_limited"]


class FakeClock:
    """Virtual time. Use ``async with clock.autojump():`` around the code under test."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._counter), waiter))
        await waiter

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)

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
            # Sleepers cancelled meanwhile are skipped.
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)
            if self._sleepers:
                self.advance(max(0.0, self._sleepers[0][0] - self._now))
            else:
                await asyncio.sleep(0.001)  # blocked on something else than time: real I/O, a thread


def _all_other_tasks_blocked() -> bool:
    this = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is this:
            continue
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        if waiter is None or waiter.done():
            return False
    return True


Handler = Callable[[str, Mapping[str, Any]], "Response | Exception | Awaitable[Response | Exception]"]


class FakeTransport:
    """Answers from ``handler(endpoint, body)`` or, in turn, from ``script`` (then ``ok()`` once it runs out).

    A handler or script item may be an exception (e.g. ``TransportFailure("connection", "reset")``) to raise.
    ``calls`` records ``(endpoint, body)`` of every attempt, and ``sent_at`` its time on ``clock``.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        script: Iterable[Response | Exception] = (),
        clock: Any = None,
    ) -> None:
        self._handler = handler
        self._script = list(script)
        self._clock = clock
        self.calls: list[tuple[str, Mapping[str, Any]]] = []
        self.sent_at: list[float] = []

    async def _answer(self, endpoint: str, body: Mapping[str, Any]) -> Response:
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
            answer = ok()
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response:
        return await self._answer(endpoint, body)

    @contextlib.asynccontextmanager
    async def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> AsyncIterator[StreamResponse]:
        answer = await self._answer(endpoint, body)

        async def events() -> AsyncIterator[dict[str, Any]]:
            if answer.status != 200:
                return
            message = answer.body["choices"][0]["message"]["content"]
            for word in message.split(" "):
                yield {"id": "chatcmpl-fake", "model": body.get("model"),
                       "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            yield {"id": "chatcmpl-fake", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield {"id": "chatcmpl-fake", "choices": [], "usage": answer.body.get("usage")}

        yield StreamResponse(answer.status, answer.headers, answer.body if answer.status != 200 else None,
                             events(), answer.request_id)


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


__all__ += ["TransportFailure"]
