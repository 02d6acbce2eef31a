"""The mock OpenAI-compatible HTTP server: chat, embeddings, responses, models, stats."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import random
import struct
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .batches import BatchMock
from .config import MockConfig
from .ratelimit import RateLimiter, Refusal, format_duration

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", "mock-model")
EMBEDDING_DIM = 8
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_ORG = "org-mock"
_LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."


class _BadRequest(Exception):
    """A 400 with OpenAI's invalid_request_error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(slots=True)
class _Job:
    """A parsed API request: what it costs and what to answer."""

    model: str
    prompt_tokens: int
    completion_tokens: int  # per choice
    n: int
    hit_cap: bool  # the reply stops because of the caller's output cap
    cost: int  # tokens charged to the TPM buckets
    words: list[str]  # words the reply text is made from


_Parser = Callable[[dict[str, Any], MockConfig], _Job]
_Renderer = Callable[[web.Request, dict[str, Any], _Job, dict[str, str]], Awaitable[web.StreamResponse]]


class _Stats:
    """Counters behind GET /stats."""

    __slots__ = (
        "admitted",
        "admitted_tokens",
        "bad_requests",
        "completion_tokens",
        "dropped",
        "ok",
        "prompt_tokens",
        "quota",
        "rate_limited",
        "requests",
        "server_errors",
        "t0",
        "timeline",
        "unauthorized",
    )

    def __init__(self, now: float) -> None:
        self.t0 = now
        self.requests = self.ok = self.rate_limited = self.quota = 0
        self.server_errors = self.dropped = self.unauthorized = self.bad_requests = 0
        self.admitted = self.admitted_tokens = self.prompt_tokens = self.completion_tokens = 0
        self.timeline: list[list[int]] = []  # per second: [admitted, admitted tokens, rate limited]

    def second(self, now: float) -> list[int]:
        """The timeline bucket of `now`, creating empty seconds up to it so plots have no gaps."""
        i = int(now - self.t0)
        tl = self.timeline
        while len(tl) <= i:
            tl.append([0, 0, 0])
        return tl[i]

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "quota": self.quota,
            "server_errors": self.server_errors,
            "dropped": self.dropped,
            "unauthorized": self.unauthorized,
            "bad_requests": self.bad_requests,
            "admitted": self.admitted,
            "admitted_tokens": self.admitted_tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "elapsed_s": round(now - self.t0, 3),
            "timeline": [
                {"t": i, "requests": r, "tokens": tok, "rate_limited": rl}
                for i, (r, tok, rl) in enumerate(self.timeline)
            ],
        }


_DEFAULT_CONFIG = MockConfig()


class MockServer:
    """OpenAI-compatible mock server enforcing RPM/TPM like OpenAI; an async context manager."""

    def __init__(self, config: MockConfig = _DEFAULT_CONFIG, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self._host = host
        self._port = port
        self._rng = random.Random(config.seed)
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter = RateLimiter(config.rpm, config.tpm, config.quantum_s, 0.0)
        self._stats = _Stats(0.0)
        self._runner: web.AppRunner | None = None
        self.batches = BatchMock(config, self._now)  # the Files and Batches APIs, with their counters and faults

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> MockServer:
        self._loop = asyncio.get_running_loop()
        self.reset()
        # No access log: per-request logging would dominate the cost of a mock request.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        """The bound port (valid after enter)."""
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. "http://127.0.0.1:PORT/v1" (valid after enter)."""
        if self._runner is None:
            raise RuntimeError("MockServer is not running; use `async with MockServer(...)`")
        return f"http://{self._host}:{self._port}/v1"

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def stats(self) -> dict[str, Any]:
        """Counters and per-second timeline since start or the last reset (same as GET /stats)."""
        return self._stats.as_dict(self._now())

    def reset(self) -> None:
        """Zero the counters, refill the buckets and reseed, so benchmark runs start alike."""
        now = self._now()
        self._stats = _Stats(now)
        self._limiter.fill(now)
        self._rng.seed(self.config.seed)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_post("/v1/responses", self._responses)
        r.add_get("/v1/models", self._models)
        r.add_get("/stats", self._get_stats)
        r.add_post("/stats/reset", self._reset_stats)
        self.batches.add_routes(app)
        # Catch-all last: unknown paths and wrong methods get OpenAI's 404 body, not aiohttp's text.
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    # -- endpoints ---------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _parse_chat, _render_chat)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _parse_embeddings, _render_embeddings)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _parse_responses, _render_responses)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        headers = self._limiter.headers(self._now())
        headers["x-request-id"] = _request_id()
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return _invalid_key(headers)
        created = 1_700_000_000
        data = [{"id": m, "object": "model", "created": created, "owned_by": "mock"} for m in MODELS]
        return _json({"object": "list", "data": data}, 200, headers)

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self.stats(), 200, {"x-request-id": _request_id()})

    async def _reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return _json(self.stats(), 200, {"x-request-id": _request_id()})

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        self._stats.requests += 1
        self._stats.bad_requests += 1
        return _error(
            404,
            f"Invalid URL ({request.method} {request.path})",
            "invalid_request_error",
            None,
            None,
            {"x-request-id": _request_id()},
        )

    # -- the common path of an API request ---------------------------------------------------------

    async def _handle(self, request: web.Request, parse: _Parser, render: _Renderer) -> web.StreamResponse:
        """Auth, quota, parse, rate limit, faults, latency, then `render`."""
        cfg = self.config
        st = self._stats
        st.requests += 1
        now = self._now()
        limiter = self._limiter

        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            st.unauthorized += 1
            return _invalid_key(_headers(limiter, now))
        if cfg.quota_after is not None and st.admitted >= cfg.quota_after:
            st.quota += 1
            return _error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                None,
                "insufficient_quota",
                _headers(limiter, now),
            )
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise _BadRequest("The request body must be a JSON object.")
            job = parse(body, cfg)
        except orjson.JSONDecodeError:
            st.bad_requests += 1
            return _error(
                400,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
                None,
                _headers(limiter, now),
            )
        except _BadRequest as e:
            st.bad_requests += 1
            return _error(400, e.message, "invalid_request_error", e.param, e.code, _headers(limiter, now))

        refusal = limiter.admit(job.cost, now)
        if refusal is not None:
            st.rate_limited += 1
            st.second(now)[2] += 1
            return _rate_limited(refusal, job.model, cfg, _headers(limiter, now))
        st.admitted += 1
        st.admitted_tokens += job.cost
        sec = st.second(now)
        sec[0] += 1
        sec[1] += job.cost
        headers = _headers(limiter, now)

        rng = self._rng
        if cfg.drop_rate > 0 and rng.random() < cfg.drop_rate:
            st.dropped += 1
            if request.transport is not None:
                request.transport.close()
            # Nothing reaches the client: aiohttp's write of this response fails on the closed
            # transport and is ignored as a client disconnection.
            return web.Response(status=500)
        if cfg.error_rate > 0 and rng.random() < cfg.error_rate:
            st.server_errors += 1
            status = rng.choice((500, 502, 503))
            message = {
                500: "The server had an error while processing your request. Sorry about that!",
                502: "Bad gateway.",
                503: "The engine is currently overloaded, please try again later.",
            }[status]
            return _error(status, message, "server_error", None, None, headers)

        delay_ms = cfg.latency_ms
        if delay_ms > 0 and cfg.latency_sigma > 0:
            delay_ms *= math.exp(rng.gauss(0.0, cfg.latency_sigma))
        if cfg.slow_rate > 0 and rng.random() < cfg.slow_rate:
            delay_ms += cfg.slow_ms
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)

        st.ok += 1
        st.prompt_tokens += job.prompt_tokens
        st.completion_tokens += job.completion_tokens * job.n
        return await render(request, body, job, headers)


# -- parsing ---------------------------------------------------------------------------------------


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model", "missing_required_parameter")
    return model


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(
            f"Invalid '{name}': expected an integer >= 1, got {value!r}.", name, "invalid_value"
        )
    return value


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or the `text` of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _estimate(chars: int, cfg: MockConfig) -> int:
    """Prompt tokens as OpenAI's limiter estimates them: from characters, not a tokenizer."""
    return math.ceil(chars / cfg.chars_per_token)


def _job(model: str, chars: int, cap: int | None, n: int, text: str, cfg: MockConfig) -> _Job:
    prompt = _estimate(chars, cfg)
    out_cap = cfg.completion_tokens if cap is None else cap
    return _Job(
        model=model,
        prompt_tokens=prompt,
        completion_tokens=min(out_cap, cfg.completion_tokens),
        n=n,
        hit_cap=cap is not None and cap <= cfg.completion_tokens,
        # OpenAI charges the full output cap of every choice up front.
        cost=prompt + out_cap * n,
        words=text.split()[:64],
    )


def _parse_chat(body: dict[str, Any], cfg: MockConfig) -> _Job:
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise _BadRequest("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("Invalid 'messages': expected a non-empty array.", "messages", "invalid_value")
    chars = 0
    text = ""
    for m in messages:
        if not isinstance(m, dict):
            raise _BadRequest(
                "Invalid 'messages': each message must be an object.", "messages", "invalid_type"
            )
        text = _content_text(m.get("content"))
        chars += len(text)
    cap = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    n = _positive_int(body, "n") or 1
    return _job(model, chars, cap, n, text, cfg)


def _embedding_inputs(body: dict[str, Any]) -> list[str]:
    inputs = body.get("input")
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, list) and inputs and all(isinstance(s, str) for s in inputs):
        return inputs
    if inputs is None:
        raise _BadRequest("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    raise _BadRequest(
        "Invalid 'input': expected a string or a non-empty array of strings.", "input", "invalid_type"
    )


def _parse_embeddings(body: dict[str, Any], cfg: MockConfig) -> _Job:
    model = _model(body)
    inputs = _embedding_inputs(body)
    prompt = _estimate(sum(len(s) for s in inputs), cfg)
    return _Job(model, prompt, 0, len(inputs), False, prompt, [])


def _parse_responses(body: dict[str, Any], cfg: MockConfig) -> _Job:
    model = _model(body)
    if body.get("stream"):
        raise _BadRequest("The mock server does not stream the Responses API.", "stream", "unsupported_value")
    inp = body.get("input")
    instructions = body.get("instructions")
    chars = len(instructions) if isinstance(instructions, str) else 0
    if isinstance(inp, str):
        text = inp
        chars += len(inp)
    elif isinstance(inp, list):
        text = ""
        for item in inp:
            if isinstance(item, dict):
                text = _content_text(item.get("content", item.get("output")))
                chars += len(text)
    elif inp is None:
        raise _BadRequest("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    else:
        raise _BadRequest("Invalid 'input': expected a string or an array.", "input", "invalid_type")
    return _job(model, chars, _positive_int(body, "max_output_tokens"), 1, text, cfg)


# -- rendering -------------------------------------------------------------------------------------


def _reply_words(source: list[str], count: int) -> list[str]:
    """`count` words, deterministic from the prompt: "Mock reply:" then the prompt's words, cycled."""
    words = ["Mock", "reply:"]
    src = source or list(_FILLER)
    i = 0
    while len(words) < count:
        words.append(src[i % len(src)])
        i += 1
    return words[:count]


def _chat_usage(job: _Job) -> dict[str, Any]:
    completion = job.completion_tokens * job.n
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _embedding(text: str) -> list[float]:
    """A unit vector that depends only on `text`."""
    rnd = random.Random(zlib.crc32(text.encode()))
    vec = [rnd.uniform(-1.0, 1.0) for _ in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


async def _render_chat(
    request: web.Request, body: dict[str, Any], job: _Job, headers: dict[str, str]
) -> web.StreamResponse:
    words = _reply_words(job.words, job.completion_tokens)
    finish = "length" if job.hit_cap else "stop"
    cid = "chatcmpl-" + os.urandom(12).hex()
    created = int(time.time())
    usage = _chat_usage(job)
    if not body.get("stream"):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": " ".join(words),
            "refusal": None,
            "annotations": [],
        }
        choices = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": finish} for i in range(job.n)
        ]
        out = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "choices": choices,
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        }
        return _json(out, 200, headers)

    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    base: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": job.model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    if include_usage:
        base["usage"] = None  # as OpenAI: every chunk but the last has "usage": null

    def chunk(i: int, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        c = {
            **base,
            "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        return b"data: " + orjson.dumps(c) + b"\n\n"

    parts: list[bytes] = []
    for i in range(job.n):
        parts.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}, None))
        parts.extend(chunk(i, {"content": w if j == 0 else " " + w}, None) for j, w in enumerate(words))
        parts.append(chunk(i, {}, finish))
    if include_usage:
        parts.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")

    resp = web.StreamResponse(headers=headers)
    resp.content_type = "text/event-stream"
    resp.headers["Cache-Control"] = "no-cache"
    await resp.prepare(request)
    # The latency was already spent before the first byte; pacing chunks would only slow benchmarks.
    await resp.write(b"".join(parts))
    await resp.write_eof()
    return resp


async def _render_embeddings(
    request: web.Request, body: dict[str, Any], job: _Job, headers: dict[str, str]
) -> web.StreamResponse:
    as_base64 = body.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    for i, text in enumerate(_embedding_inputs(body)):
        vec = _embedding(text)
        emb: Any = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vec)).decode() if as_base64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return _json({"object": "list", "data": data, "model": job.model, "usage": usage}, 200, headers)


async def _render_responses(
    request: web.Request, body: dict[str, Any], job: _Job, headers: dict[str, str]
) -> web.StreamResponse:
    text = " ".join(_reply_words(job.words, job.completion_tokens))
    message = {
        "type": "message",
        "id": "msg_" + os.urandom(12).hex(),
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    out = {
        "id": "resp_" + os.urandom(12).hex(),
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
        "usage": {
            "input_tokens": job.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": job.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        },
    }
    return _json(out, 200, headers)


# -- responses -------------------------------------------------------------------------------------


def _request_id() -> str:
    return "req_" + os.urandom(16).hex()


def _headers(limiter: RateLimiter, now: float) -> dict[str, str]:
    headers = limiter.headers(now)
    headers["x-request-id"] = _request_id()
    return headers


def _json(obj: Any, status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )


def _error(
    status: int, message: str, type_: str, param: str | None, code: str | None, headers: dict[str, str]
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return _json(body, status, headers)


def _invalid_key(headers: dict[str, str]) -> web.Response:
    # Never echo the key back: the body may end up in logs.
    message = "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
    return _error(401, message, "invalid_request_error", None, "invalid_api_key", headers)


def _rate_limited(refusal: Refusal, model: str, cfg: MockConfig, headers: dict[str, str]) -> web.Response:
    unit = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
    where = f"for {model} in organization {_ORG} on {unit}"
    if refusal.too_large:
        burst = refusal.limit * cfg.quantum_s / 60.0
        message = (
            f"Request too large {where}: Limit {refusal.limit} ({burst:g} per {cfg.quantum_s:g}s burst), "
            f"Requested {refusal.requested}. The input or output tokens must be reduced in order to run "
            f"successfully. {_LIMITS_URL}"
        )
        # No retry-after: waiting cannot make this request fit.
    else:
        retry_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
        message = (
            f"Rate limit reached {where}: Limit {refusal.limit}, Used {refusal.used}, "
            f"Requested {refusal.requested}. Please try again in {format_duration(retry_ms / 1000)}. "
            + _LIMITS_URL
        )
        headers["retry-after-ms"] = str(retry_ms)
        headers["retry-after"] = str(math.ceil(retry_ms / 1000))
    return _error(429, message, refusal.kind, None, "rate_limit_exceeded", headers)


async def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run a MockServer until cancelled; print its base URL to stderr once it listens."""
    async with MockServer(config, host, port) as server:
        print(f"mock OpenAI server listening on {server.base_url}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
