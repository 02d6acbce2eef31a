"""The mock's answers: chat completions (JSON or SSE), embeddings and responses, with the faults that bend them.

The reply text is deterministic: "Mock reply:" then the prompt's last message's words, cycled, one word per
completion token; structured outputs answer JSON generated from the schema (see `schema.py`).
"""

from __future__ import annotations

import base64
import math
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from .config import MockConfig
from .parse import Job, embedding_of
from .respond import random_hex
from .schema import instance_of

_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
_STREAM_ERROR = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
FEW_DELTAS = 3  # deltas sent before a stream fault strikes, unless its argument says how many
_PIECE = 16  # characters per streamed delta of JSON or refusal text


class Answer:
    """What one chat/responses answer says: content or refusal, split into stream pieces."""

    __slots__ = ("content", "finish", "pieces", "refusal")

    def __init__(self, content: str | None, refusal: str | None, pieces: list[str], finish: str) -> None:
        self.content = content
        self.refusal = refusal
        self.pieces = pieces
        self.finish = finish


def reply_words(source: list[str], count: int) -> list[str]:
    """`count` words, deterministic from the prompt: "Mock reply:" then the prompt's words, cycled."""
    src = source or list(_FILLER)
    rest = max(0, count - 2)
    return (["Mock", "reply:"] + src * (rest // len(src) + 1))[:count]


def _chunks(text: str) -> list[str]:
    return [text[i : i + _PIECE] for i in range(0, len(text), _PIECE)] or [""]


def compose(job: Job, cfg: MockConfig, faults: frozenset[str], invalid_schema: bool, filled: bool) -> Answer:
    """The answer to `job`; updates `job.completion_tokens` to what the answer really uses.

    Args:
        faults: the names of the request's faults (refusal, invalid_json matter here).
        invalid_schema: invalid_json gives valid JSON that breaks the schema, not broken JSON.
        filled: the answer must use the whole output cap (max_output, fill_output_cap).
    """
    if "refusal" in faults:
        job.completion_tokens = min(math.ceil(len(REFUSAL_TEXT) / cfg.chars_per_token), job.cap or 1 << 30)
        return Answer(None, REFUSAL_TEXT, _chunks(REFUSAL_TEXT), "stop")
    if job.json_mode or "invalid_json" in faults:
        value: Any = instance_of(job.schema, (job.words or ["reply"])[0]) if job.schema is not None else {
            "reply": " ".join(reply_words(job.words, 8))
        }
        if "invalid_json" in faults and invalid_schema:
            value = {"mock": "wrong type"} if isinstance(value, list) else ["mock"]
        text = orjson.dumps(value).decode()
        if "invalid_json" in faults and not invalid_schema:
            text = text[: max(1, len(text) // 2)]  # broken JSON: an unterminated object
        tokens = math.ceil(len(text) / cfg.chars_per_token)
        if job.cap is not None and tokens > job.cap:
            # The cap cuts the JSON short, as a length-limited structured answer is cut.
            text, tokens = text[: int(job.cap * cfg.chars_per_token)], job.cap
        elif filled:
            # Forced to the longest output: the JSON never gets to close.
            text, tokens = text[: max(1, len(text) // 2)], job.completion_tokens
        job.completion_tokens = tokens
        return Answer(text, None, _chunks(text), "length" if job.hit_cap else "stop")
    words = reply_words(job.words, job.completion_tokens)
    # Stream pieces only for streams: building them costs more than the rest of a small answer.
    pieces = [words[0], *(" " + w for w in words[1:])] if job.stream and words else []
    return Answer(" ".join(words), None, pieces, "length" if job.hit_cap else "stop")


def chat_usage(job: Job) -> dict[str, Any]:
    """The usage object of a chat completion."""
    completion = job.completion_tokens * job.n
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def chat_body(job: Job, answer: Answer) -> dict[str, Any]:
    """A chat.completion object."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": answer.content,
        "refusal": answer.refusal,
        "annotations": [],
    }
    choices = [
        {"index": i, "message": message, "logprobs": None, "finish_reason": answer.finish} for i in range(job.n)
    ]
    return {
        "id": "chatcmpl-" + random_hex(24),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
        "usage": chat_usage(job),
        "service_tier": job.tier,
        "system_fingerprint": "fp_mock",
    }


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def stream_chat(
    request: web.Request, job: Job, answer: Answer, headers: dict[str, str], fault: str | None,
    after: int | None = None,
) -> web.StreamResponse:
    """A streamed chat completion as OpenAI sends it, or cut/broken as `fault` (a stream_* name) says, after
    `after` deltas (default FEW_DELTAS; 0: before the first)."""
    base: dict[str, Any] = {
        "id": "chatcmpl-" + random_hex(24),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": job.model,
        "service_tier": job.tier,
        "system_fingerprint": "fp_mock",
    }
    if job.include_usage:
        base["usage"] = None  # as OpenAI: every chunk but the last has "usage": null
    field = "refusal" if answer.refusal is not None else "content"

    def chunk(i: int, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        c = {**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return _event(c)

    parts: list[bytes] = []
    if fault == "stream_error_first":
        parts.append(_event(_STREAM_ERROR))
    else:
        for i in range(job.n):
            parts.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}, None))
            pieces = answer.pieces[: FEW_DELTAS if after is None else after] if fault else answer.pieces
            parts.extend(chunk(i, {field: p}, None) for p in pieces)
            if fault:
                break
            parts.append(chunk(i, {}, answer.finish))
        if fault is None:
            if job.include_usage:
                parts.append(_event({**base, "choices": [], "usage": chat_usage(job)}))
            parts.append(b"data: [DONE]\n\n")
        elif fault == "stream_error":
            parts.append(_event(_STREAM_ERROR))
        elif fault == "stream_error_event":
            parts.append(b"event: error\n" + _event(_STREAM_ERROR))

    resp = web.StreamResponse(headers=headers)
    resp.content_type = "text/event-stream"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    # The latency was already spent before the first byte; pacing chunks would only slow benchmarks.
    await resp.write(b"".join(parts))
    if fault == "stream_cut":
        # Close mid-body: the chunked encoding never ends, as when a connection breaks.
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


def embeddings_body(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    """A list of embeddings, one per input, each `embedding_of(input)`."""
    as_base64 = body.get("encoding_format") == "base64"
    dims = job.dimensions
    data: list[dict[str, Any]] = []
    for i, item in enumerate(job.inputs or ()):
        vec = embedding_of(item, dims)
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_base64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return {"object": "list", "data": data, "model": job.model, "usage": usage}


def responses_body(job: Job, body: dict[str, Any], answer: Answer) -> dict[str, Any]:
    """A Responses API response object."""
    content: dict[str, Any] = (
        {"type": "refusal", "refusal": answer.refusal}
        if answer.refusal is not None
        else {"type": "output_text", "text": answer.content, "annotations": []}
    )
    message = {
        "type": "message",
        "id": "msg_" + random_hex(24),
        "status": "incomplete" if job.hit_cap else "completed",
        "role": "assistant",
        "content": [content],
    }
    text = body.get("text") if isinstance(body.get("text"), dict) else None
    return {
        "id": "resp_" + random_hex(24),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if job.hit_cap else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if job.hit_cap else None,
        "error": None,
        "model": job.model,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "service_tier": job.tier,
        "text": text or {"format": {"type": "text"}},
        "usage": {
            "input_tokens": job.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": job.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        },
    }


async def broken_json(
    request: web.Request, payload: bytes, headers: dict[str, str], fault: str
) -> web.StreamResponse:
    """A non-streamed answer broken by a stream_* fault: cut (connection closed) or truncated (clean end)."""
    if fault.startswith("stream_error"):
        return web.Response(body=orjson.dumps(_STREAM_ERROR), status=200, headers=headers,
                            content_type="application/json")
    half = payload[: len(payload) // 2]
    if fault == "stream_truncated":
        return web.Response(body=half, status=200, headers=headers, content_type="application/json")
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/json"
    resp.content_length = len(payload)
    await resp.prepare(request)
    await resp.write(half)
    if request.transport is not None:
        request.transport.close()
    return resp
