"""The seam between the pool and the API: one HTTP attempt, no retries, status and headers kept."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["OpenAITransport", "Response", "StreamResponse", "Transport", "TransportFailure", "api_path"]


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP answer: status, headers (case-insensitive lookups by lower-case name), parsed JSON body."""

    status: int
    headers: Mapping[str, str]
    body: Any
    request_id: str | None = None
    #: False when the body was not JSON (an HTML page from a proxy): ``body`` then is an error body quoting it
    is_json: bool = True

    @classmethod
    def from_bytes(
        cls, status: int, headers: Mapping[str, str], content: bytes, request_id: str | None = None
    ) -> Response:
        """The answer with its body parsed (orjson), or marked as not JSON."""
        try:
            return cls(status, headers, orjson.loads(content), request_id)
        except orjson.JSONDecodeError:
            return cls(status, headers, _not_json(content, headers), request_id, is_json=False)


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """The start of a streamed answer: ``events`` yields the parsed SSE chunks (empty on an HTTP error)."""

    status: int
    headers: Mapping[str, str]
    body: Any
    events: AsyncIterator[dict[str, Any]]
    request_id: str | None = None


class TransportFailure(Exception):
    """No (whole) HTTP answer: the connection failed or dropped, the request timed out, or a stream carried an
    error event. Always retryable, unless a stream had already delivered text."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        #: ``timeout``, ``connection`` or ``stream_error``
        self.kind = kind


class Transport(Protocol):
    """Sends one request. Raises :class:`TransportFailure` when no HTTP answer came back."""

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response: ...

    def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> contextlib.AbstractAsyncContextManager[StreamResponse]: ...


def api_path(endpoint: str) -> str:
    """``/v1/chat/completions`` (the Batch API's ``url``) as the SDK's path under a base URL ending in /v1:
    ``/chat/completions``. The leading slash matters: ``AsyncAzureOpenAI`` inserts ``/deployments/{model}`` only
    for paths spelled exactly so."""
    path = endpoint.lstrip("/")
    return "/" + (path[3:] if path.startswith("v1/") else path)


def _not_json(content: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    kind = headers.get("content-type") or "no content-type"
    excerpt = " ".join(content[:300].decode("utf-8", "replace").split())
    return {"error": {"message": f"the answer is not JSON ({kind}): {excerpt}", "type": "invalid_response",
                      "param": None, "code": "invalid_json"}}


async def _no_events() -> AsyncIterator[dict[str, Any]]:
    return
    yield  # an empty async generator


class OpenAITransport:
    """Sends through the official SDK's ``AsyncOpenAI`` client, with its retries off: the pool owns retries,
    and the SDK's own would hide 429s from the scheduler.

    The body comes back as raw bytes parsed with orjson: building pydantic models for every response costs
    more CPU than the rest of the request (see benchmarks/). Any OpenAI-compatible base URL works.
    """

    __slots__ = ("_client", "_errors")

    def __init__(self, client: AsyncOpenAI) -> None:
        import openai

        self._client = client.with_options(max_retries=0)
        self._errors = openai

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response:
        import httpx2

        errors = self._errors
        try:
            raw = await self._client.post(
                api_path(endpoint), body=body, cast_to=httpx2.Response, options=_options(timeout)
            )
        except errors.APIStatusError as exc:
            return Response.from_bytes(exc.status_code, exc.response.headers, exc.response.content, exc.request_id)
        except errors.APITimeoutError as exc:
            raise TransportFailure("timeout", "the request timed out") from exc
        except errors.APIConnectionError as exc:
            raise TransportFailure("connection", _connection_message(exc)) from exc
        return Response.from_bytes(raw.status_code, raw.headers, raw.content, raw.headers.get("x-request-id"))

    @contextlib.asynccontextmanager
    async def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> AsyncIterator[StreamResponse]:
        import httpx2

        errors = self._errors
        try:
            stream = await self._client.post(
                api_path(endpoint),
                body={**body, "stream": True},
                cast_to=dict,
                stream=True,
                stream_cls=errors.AsyncStream[dict[str, Any]],
                options=_options(timeout),
            )
        except errors.APIStatusError as exc:
            answer = Response.from_bytes(exc.status_code, exc.response.headers, exc.response.content)
            yield StreamResponse(exc.status_code, answer.headers, answer.body, _no_events(), exc.request_id)
            return
        except errors.APITimeoutError as exc:
            raise TransportFailure("timeout", "the request timed out") from exc
        except errors.APIConnectionError as exc:
            raise TransportFailure("connection", _connection_message(exc)) from exc

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                async for chunk in stream:
                    yield chunk
            except (httpx2.TransportError, errors.APIConnectionError) as exc:
                raise TransportFailure("connection", "the stream was cut off") from exc
            except errors.APIError as exc:
                # An SSE error event (the SDK raises APIError for a chunk carrying "error").
                raise TransportFailure("stream_error", f"the server sent an error event: {exc.message}") from exc
            except ValueError as exc:
                raise TransportFailure("stream_error", f"the stream carried an unreadable event: {exc}") from exc

        response = stream.response
        try:
            yield StreamResponse(200, response.headers, None, events(), response.headers.get("x-request-id"))
        finally:
            await stream.close()


def _options(timeout: float | None) -> Any:
    return {"timeout": timeout} if timeout is not None else {}


def _connection_message(exc: BaseException) -> str:
    # The cause names the failure (refused, reset); the SDK's own message is a bare "Connection error."
    cause = exc.__cause__
    return f"connection error: {type(cause).__name__}" if cause is not None else "connection error"
