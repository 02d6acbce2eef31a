"""Where results go: a Batch-API JSONL file, a callback, or a list in memory."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from .results import Result

__all__ = ["CallbackSink", "JsonlSink", "MemorySink", "Sink", "batch_line"]


class Sink(Protocol):
    """Receives every result, success or error, in completion order."""

    async def write(self, result: Result) -> None: ...

    async def aclose(self) -> None: ...


def batch_line(result: Result) -> dict[str, Any]:
    """One line of the OpenAI Batch API output format, plus our figures under ``scheduler``.

    ``response`` is the last HTTP answer (also for failures that had one); ``error`` says why a job failed.
    The ``id`` derives from the ``custom_id``, so writing a result twice writes the same line.
    """
    response = None
    if result.status is not None:
        response = {"status_code": result.status, "request_id": result.request_id, "body": result.body}
    error = None if result.error is None else {"code": result.error.code, "message": result.error.message}
    digest = hashlib.blake2b(result.custom_id.encode(), digest_size=12).hexdigest()
    extra: dict[str, Any] = {"attempts": result.attempts, "latency_s": round(result.latency_s, 4)}
    if result.model is not None:
        extra["model"] = result.model
    if result.cost_usd is not None:
        extra["cost_usd"] = round(result.cost_usd, 8)
    if result.cached:
        extra["cached"] = True
    if result.ok and result.truncated:
        extra["truncated"] = True
    if result.trimmed:
        extra["trimmed"] = result.trimmed
    if result.tier is not None:
        extra["tier"] = result.tier
    if result.batch_id is not None:
        extra["batch_id"] = result.batch_id
    if result.served_by is not None:
        extra["endpoint"] = result.served_by
    if result.coalesced is not None:
        extra["coalesced"] = result.coalesced
    return {
        "id": f"batch_req_{digest}",
        "custom_id": result.custom_id,
        "response": response,
        "error": error,
        "scheduler": extra,
    }


class JsonlSink:
    """Appends one Batch-API output line per result (orjson), flushed at once so a crash loses none."""

    __slots__ = ("_file", "path")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] = self.path.open("ab")

    async def write(self, result: Result) -> None:
        self._file.write(orjson.dumps(batch_line(result)) + b"\n")
        self._file.flush()

    async def aclose(self) -> None:
        self._file.close()


class CallbackSink:
    """Calls ``callback(result)`` (a function or a coroutine function) for every result."""

    __slots__ = ("_callback", "_is_async")

    def __init__(self, callback: Callable[[Result], Awaitable[None] | None]) -> None:
        self._callback = callback
        self._is_async = inspect.iscoroutinefunction(callback)

    async def write(self, result: Result) -> None:
        outcome = self._callback(result)
        if self._is_async:
            await outcome  # type: ignore[misc]

    async def aclose(self) -> None:
        return None


class MemorySink:
    """Keeps every result in ``results`` (tests and small jobs)."""

    __slots__ = ("results",)

    def __init__(self) -> None:
        self.results: list[Result] = []

    async def write(self, result: Result) -> None:
        self.results.append(result)

    async def aclose(self) -> None:
        return None
