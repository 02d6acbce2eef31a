"""Streamed jobs: relaying a chat completion's deltas as they arrive, and the caller's end of it.

A stream is admitted like any job. Its attempt is a success only if every choice ended with a finish reason: a
stream cut off, ended without one (no ``[DONE]``), or carrying an SSE error event is a failed attempt, retried if
no text was delivered yet, else the job fails with ``stream_incomplete`` (repeating text already shown is worse).
The caller may leave at any time (``break``, an exception, cancellation): the request is cancelled and its worker
freed at once.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from .errors import error_for
from .transport import Response, Transport, TransportFailure

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from ._job import Job
    from .results import Result

__all__ = ["PoolStream", "StreamBroken", "relay"]


class StreamBroken(TransportFailure):
    """A streamed attempt broke off; ``delivered`` says whether text had already reached the caller."""

    def __init__(self, kind: str, message: str, delivered: bool) -> None:
        super().__init__(kind, message)
        self.delivered = delivered


async def relay(job: Job, transport: Transport, timeout: float | None) -> Response:
    """Run one streamed attempt of ``job``, sending the first choice's text deltas to ``job.stream_to``; the
    whole answer comes back assembled as a chat completion.

    Raises:
        StreamBroken: the stream broke off or ended incomplete.
        TransportFailure: no answer at all.
    """
    assert job.stream_to is not None
    delivered = False
    async with transport.stream(job.endpoint, job.body, timeout=timeout) as answer:
        if answer.status != 200:
            return Response(answer.status, answer.headers, answer.body, answer.request_id)
        texts: dict[int, list[str]] = {}
        finished: dict[int, str] = {}
        usage: Any = None
        first: dict[str, Any] = {}
        try:
            async for chunk in answer.events:
                first = first or chunk
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    index = choice.get("index", 0)
                    parts = texts.setdefault(index, [])
                    if choice.get("finish_reason"):
                        finished[index] = choice["finish_reason"]
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        if index == 0:
                            delivered = True
                            await job.stream_to.send(text)
        except TransportFailure as exc:
            raise StreamBroken(exc.kind, str(exc), delivered) from exc
        if not texts or set(texts) - set(finished):
            raise StreamBroken("incomplete", "the stream ended without a finish reason", delivered)
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                "finish_reason": finished[i]} for i in sorted(texts)]
    body = {"id": first.get("id"), "object": "chat.completion", "model": first.get("model"), "choices": choices,
            "usage": usage}
    return Response(200, answer.headers, body, answer.request_id)


class PoolStream:
    """The text deltas of a streamed job (iterate it once); ``result`` holds the whole Result afterwards.

    Leaving the loop early cancels the request and frees its worker: at once after ``break`` (the loop's
    iterator is dropped), or where you choose with ``async with pool.stream(...) as deltas:`` or
    :meth:`aclose`. Raises the job's error (a ``JobError``) when it fails.
    """

    def __init__(
        self, start: Callable[[], Awaitable[tuple[Job, MemoryObjectReceiveStream[str]]]],
        abandon: Callable[[Job], None],
    ) -> None:
        self._start = start
        self._abandon = abandon
        # Weak: the loop holds the generator, so dropping the loop (break) finalizes it and cancels the job.
        self._deltas: weakref.ref[AsyncGenerator[str, None]] | None = None
        #: the job's Result, once the stream has ended
        self.result: Result | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._deltas is not None:
            raise RuntimeError("a PoolStream can be iterated only once")
        deltas = self._run()
        self._deltas = weakref.ref(deltas)
        return deltas

    async def aclose(self) -> None:
        """Stop: cancel the request if it is still running."""
        deltas = self._deltas() if self._deltas is not None else None
        if deltas is not None:
            await deltas.aclose()

    async def __aenter__(self) -> PoolStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[str, None]:
        job, receive = await self._start()
        settled = False
        try:
            with receive:
                async for delta in receive:
                    yield delta
            assert job.future is not None
            self.result = result = await job.future
            settled = True
        finally:
            if not settled:
                self._abandon(job)
        if result.error is not None:
            raise error_for(result)


def stream_channel() -> tuple[MemoryObjectSendStream[str], MemoryObjectReceiveStream[str]]:
    """The bounded channel from the worker to the caller: a slow reader slows the worker, not memory."""
    return anyio.create_memory_object_stream[str](64)
