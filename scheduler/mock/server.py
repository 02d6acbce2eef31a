"""The mock OpenAI-compatible HTTP server: chat, embeddings, responses, models, stats and fault control.

One request's path: key -> quota -> parse (OpenAI's 400s) -> scripted fault -> flex capacity -> the dialect's
limits of its scope (key x model) -> faults -> capacity queue -> latency -> the answer -> usage settled.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .batches import BatchMock
from .config import KeyLimits, MockConfig
from .dialects import DIALECT_TYPES, Dialect, Scope
from .faults import BAD_SHAPE, HTML_PAGE, REFUSALS, Fault, FaultPlan, corrupt_headers
from .parse import BadRequest, Job, Parser, parse_chat, parse_embeddings, parse_responses
from .ratelimit import Refusal
from .render import FEW_DELTAS, broken_json, chat_body, compose, embeddings_body, responses_body, stream_chat
from .respond import error_response, invalid_key, json_response, request_id
from .stats import Stats

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", "mock-model")
_NO_FAULTS: frozenset[str] = frozenset()
_SERVER_ERRORS = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
}
_FLEX_UNAVAILABLE = (
    "Resource unavailable: there is not enough capacity for flex processing of this request right now. "
    "Retry later, or send it with service_tier 'auto' or 'default'."
)

_DEFAULT_CONFIG = MockConfig()


def _label(key: str) -> str:
    """How /stats names a key: short keys as they are, long ones shortened so secrets do not leak whole."""
    return key if len(key) <= 12 else f"{key[:4]}...{key[-4:]}"


def _given_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is not None and auth.startswith("Bearer "):
        return auth[7:]
    # Azure's SDK sends api-key, Anthropic's x-api-key.
    return request.headers.get("api-key") or request.headers.get("x-api-key")


class MockServer:
    """OpenAI-compatible mock server enforcing RPM/TPM like OpenAI (or another dialect); an async context manager.

    Args:
        config: limits, faults, dialect.
        host, port: where to listen (port 0 picks a free one).
        clock: wall-clock seconds (default `time.time`): buckets, fixed windows (aligned to multiples of their
            length, so a 60 s window is the calendar minute), reset times and the date header all read it; tests
            pass their own to step across a window boundary.
    """

    def __init__(
        self,
        config: MockConfig = _DEFAULT_CONFIG,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self._host = host
        self._port = port
        self._clock = clock or time.time
        self._rng = random.Random(config.seed)
        self._dialect: Dialect = DIALECT_TYPES[config.dialect](config)
        self._keys: dict[str, KeyLimits] | None = dict(config.keys) if config.keys is not None else None
        self._simple = self._keys is None and not config.model_limits  # one scope for every request
        self._keyed = self._keys is not None or config.api_key is not None
        self._scopes: dict[tuple[str | None, str | None], Scope] = {}
        self._default_scope: Scope = self._dialect.scope(config.rpm, config.tpm, config.otpm, 0.0)
        self._plan = FaultPlan(config.fault_rates)
        self._stats = Stats(0.0)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._runner: web.AppRunner | None = None
        self.batches = BatchMock(config, time.monotonic)  # the Files and Batches APIs, with their counters and faults

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> MockServer:
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

    def stats(self) -> dict[str, Any]:
        """Counters and per-second timeline since start or the last reset (same as GET /stats)."""
        st = self._stats
        st.in_flight, st.queued = self._in_flight, len(self._waiters)
        return st.as_dict(self._clock())

    def reset(self) -> None:
        """Zero the counters, refill the buckets, reseed and drop scripted faults, so runs start alike."""
        now = self._clock()
        self._stats = Stats(now)
        cfg = self.config
        self._scopes.clear()
        self._default_scope = self._dialect.scope(cfg.rpm, cfg.tpm, cfg.otpm, now)
        self._rng.seed(cfg.seed)
        self._plan.clear()

    def inject(self, *faults: str) -> None:
        """Make the next requests, in arrival order, get these faults (one spec per request).

        A spec is a fault name, optionally with an argument (``"server_error:503"``, ``"slow:2000"``), or several
        joined by ``+``; see `scheduler.mock.faults`. Each valid request (past the key check and OpenAI's 400s)
        takes the next spec; one the rate limiter refuses leaves its spec for the next request, except the
        refusals (quota, retry_after_long, flex_unavailable), which answer before the limiter.

        Raises:
            ValueError: an unknown fault or a bad argument (nothing is queued).
        """
        self._plan.inject(faults)

    def pending_faults(self) -> list[str]:
        """Scripted faults not yet taken by a request."""
        return self._plan.pending()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_post("/v1/responses", self._responses)
        r.add_get("/v1/models", self._models)
        # Azure OpenAI's paths (the deployment names the model when the body does not).
        r.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        r.add_post("/openai/deployments/{deployment}/embeddings", self._embeddings)
        r.add_get("/stats", self._get_stats)
        r.add_post("/stats/reset", self._reset_stats)
        r.add_get("/mock/faults", self._get_faults)
        r.add_post("/mock/faults", self._post_faults)
        r.add_delete("/mock/faults", self._delete_faults)
        self.batches.add_routes(app)
        # Catch-all last: unknown paths and wrong methods get OpenAI's 404 body, not aiohttp's text.
        r.add_route("*", "/{tail:.*}", self._not_found)
        return app

    # -- control endpoints -------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        now = self._clock()
        headers = self._headers(self._default_scope, now)
        if not self._authorized(request):
            return invalid_key(headers)
        created = 1_700_000_000
        data = [{"id": m, "object": "model", "created": created, "owned_by": "mock"} for m in MODELS]
        return json_response({"object": "list", "data": data}, 200, headers)

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.stats(), 200, {"x-request-id": request_id()})

    async def _reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return json_response(self.stats(), 200, {"x-request-id": request_id()})

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return json_response({"pending": self._plan.pending()}, 200, {})

    async def _post_faults(self, request: web.Request) -> web.StreamResponse:
        """POST /mock/faults with a JSON list of fault specs (or {"faults": [...]}): queue them."""
        try:
            body = orjson.loads(await request.read())
            specs = body.get("faults") if isinstance(body, dict) else body
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise ValueError('expected a JSON list of fault specs, e.g. ["html", "server_error:503"]')
            self._plan.inject(specs)
        except (orjson.JSONDecodeError, ValueError) as e:
            return error_response(400, str(e), "invalid_request_error", None, None, {})
        return json_response({"pending": self._plan.pending()}, 200, {})

    async def _delete_faults(self, request: web.Request) -> web.StreamResponse:
        self._plan.clear()
        return json_response({"pending": []}, 200, {})

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        self._stats.requests += 1
        self._stats.bad_requests += 1
        return error_response(
            404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None, None,
            {"x-request-id": request_id()},
        )

    # -- the common path of an API request ---------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_chat)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_embeddings)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_responses)

    def _authorized(self, request: web.Request) -> bool:
        cfg = self.config
        if self._keys is not None:
            return _given_key(request) in self._keys
        return cfg.api_key is None or _given_key(request) == cfg.api_key

    def _headers(self, scope: Scope | None, now: float) -> dict[str, str]:
        headers = self._dialect.base_headers(now)
        if scope is not None and self.config.rate_limit_headers:
            scope.write_headers(now, headers)
        return headers

    def _early_headers(self, now: float) -> dict[str, str]:
        """Headers of an answer given before the request's scope is known (401, quota, 400)."""
        return self._headers(self._default_scope if self._simple else None, now)

    def _scope(self, key: str | None, model: str, now: float) -> Scope:
        cfg = self.config
        limits = self._keys[key] if self._keys is not None and key is not None else None
        models = limits.model_limits if limits is not None and limits.model_limits is not None else cfg.model_limits
        if model in models:
            scope_key: tuple[str | None, str | None] = (key, model)
            rpm, tpm, otpm = models[model]
        else:
            scope_key = (key, None)
            rpm, tpm, otpm = (limits.rpm, limits.tpm, limits.otpm) if limits is not None else (
                cfg.rpm, cfg.tpm, cfg.otpm)
        scope = self._scopes.get(scope_key)
        if scope is None:
            if scope_key == (None, None):
                scope = self._default_scope
            else:
                scope = self._scopes[scope_key] = self._dialect.scope(rpm, tpm, otpm, now)
        return scope

    async def _handle(self, request: web.Request, parse: Parser) -> web.StreamResponse:
        cfg = self.config
        st = self._stats
        st.requests += 1
        now = self._clock()
        dialect = self._dialect

        key: str | None = None
        if self._keyed:
            given = _given_key(request)
            if (given not in self._keys) if self._keys is not None else (given != cfg.api_key):
                st.unauthorized += 1
                return invalid_key(self._early_headers(now))
            if self._keys is not None:
                key = given
        if cfg.quota_after is not None and st.admitted >= cfg.quota_after:
            st.quota += 1
            return _quota(self._early_headers(now))
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise BadRequest("The request body must be a JSON object.")
            if "model" not in body and "deployment" in request.match_info:
                body["model"] = request.match_info["deployment"]
            job = parse(body, cfg)
        except orjson.JSONDecodeError:
            st.bad_requests += 1
            return error_response(400, "We could not parse the JSON body of your request.",
                                  "invalid_request_error", None, None, self._early_headers(now))
        except BadRequest as e:
            st.bad_requests += 1
            return error_response(400, e.message, e.type, e.param, e.code, self._early_headers(now))

        scope = self._default_scope if self._simple else self._scope(key, job.model, now)
        per_model = st.per_model.get(job.model) or st.counters(st.per_model, job.model)
        per_model[0] += 1
        per_key: list[int] | None = None
        if key is not None:
            label = _label(key)
            per_key = st.per_key.get(label) or st.counters(st.per_key, label)
            per_key[0] += 1

        plan = self._plan
        rng = self._rng
        faults: tuple[Fault, ...] = plan.pop() if plan.script else ()
        if not faults and plan.refusals_drawn:
            faults = plan.draw_refusal(rng, job.tier == "flex")
        if faults:
            refused = self._refusal(faults, job, scope, request, now)
            if refused is not None:
                return refused
        if job.tier == "flex":
            if cfg.flex_capacity < 1.0 and rng.random() >= cfg.flex_capacity:
                st.flex_unavailable += 1
                return _flex_unavailable(self._headers(scope, now))
            st.flex_served += 1

        refusal = scope.check_in(job, now)
        if refusal is not None:
            if faults:
                plan.push_back(faults)  # the next admitted request gets them
            st.rate_limited += 1
            st.second(now)[2] += 1
            per_model[2] += 1
            if per_key is not None:
                per_key[2] += 1
            return dialect.rate_limited(refusal, job, self._headers(scope, now), request)
        st.admitted += 1
        st.admitted_tokens += job.cost
        sec = st.second(now)
        sec[0] += 1
        sec[1] += job.cost
        per_model[3] += job.cost
        if per_key is not None:
            per_key[3] += job.cost
        headers = self._headers(scope, now)

        if cfg.drop_rate > 0 and rng.random() < cfg.drop_rate:
            return self._drop(request)
        if cfg.error_rate > 0 and rng.random() < cfg.error_rate:
            return self._server_error(rng.choice((500, 502, 503)), headers)
        if not faults and plan.drawn:
            faults = plan.draw(rng, job.stream)
        names = _NO_FAULTS
        if faults:
            names = frozenset(f.name for f in faults)
            replaced = self._outcome(request, faults, names, headers, now)
            if replaced is not None:
                return replaced

        if cfg.capacity is not None and not await self._acquire():
            st.overloaded += 1
            return dialect.overloaded(cfg.overload_status, headers)
        try:
            delay_ms = cfg.latency_ms
            if delay_ms > 0 and cfg.latency_sigma > 0:
                delay_ms *= math.exp(rng.gauss(0.0, cfg.latency_sigma))
            if cfg.slow_rate > 0 and rng.random() < cfg.slow_rate:
                delay_ms += cfg.slow_ms
            if job.tier == "flex":
                delay_ms += cfg.flex_latency_ms
            for f in faults:
                if f.name == "slow":
                    delay_ms += f.number(cfg.slow_ms)
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000.0)
            return await self._answer(request, body, job, scope, per_key, headers, faults, names)
        finally:
            if cfg.capacity is not None:
                self._release()

    def _outcome(
        self, request: web.Request, faults: tuple[Fault, ...], names: frozenset[str], headers: dict[str, str],
        now: float,
    ) -> web.StreamResponse | None:
        """Count an admitted request's faults, bend its headers, and answer in place of the model if one says so."""
        st = self._stats
        for f in faults:
            st.faults[f.name] += 1
            if f.name.startswith("headers_"):
                corrupt_headers(headers, f.name)
        if "drop" in names:
            return self._drop(request)
        for f in faults:
            if f.name == "server_error":
                return self._server_error(int(f.arg) if f.arg else self._rng.choice((500, 502, 503)), headers)
        if "html" in names:
            base = self._dialect.base_headers(now)  # a proxy's page carries none of the API's headers
            return web.Response(body=HTML_PAGE, status=200, headers=base, content_type="text/html")
        if "bad_shape" in names:
            return web.Response(body=BAD_SHAPE, status=200, headers=headers, content_type="application/json")
        return None

    def _refusal(
        self, faults: tuple[Fault, ...], job: Job, scope: Scope, request: web.Request, now: float
    ) -> web.StreamResponse | None:
        """Answer a refusal fault (before the limiter, charging nothing), if there is one."""
        for f in faults:
            if f.name not in REFUSALS:
                continue
            st = self._stats
            headers = self._headers(scope, now)
            for g in faults:
                st.faults[g.name] += 1
                if g.name.startswith("headers_"):
                    corrupt_headers(headers, g.name)
            if f.name == "quota":
                st.quota += 1
                return _quota(headers)
            if f.name == "flex_unavailable":
                st.flex_unavailable += 1
                return _flex_unavailable(headers)
            st.rate_limited += 1
            seconds = f.number(self.config.retry_after_long_s)
            refusal = Refusal("requests", self.config.rpm or 0, self.config.rpm or 0, 1, seconds, False)
            return self._dialect.rate_limited(refusal, job, headers, request)
        return None

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        job: Job,
        scope: Scope,
        per_key: list[int] | None,
        headers: dict[str, str],
        faults: tuple[Fault, ...],
        names: frozenset[str],
    ) -> web.StreamResponse:
        cfg = self.config
        st = self._stats
        stream_fault: str | None = None
        stream_after: int | None = None
        invalid_schema = False
        filled = False
        for f in faults:
            if f.name.startswith("stream_"):
                stream_fault = f.name
                stream_after = int(f.number(FEW_DELTAS))
            elif f.name == "invalid_json":
                invalid_schema = f.arg == "schema"
            elif f.name == "max_output":
                filled = True
                if job.cap is not None:
                    job.completion_tokens = job.cap
                else:
                    job.completion_tokens = int(f.number(cfg.long_output_tokens))
                    job.cut = True
        if cfg.fill_output_cap and job.cap is not None and not filled:
            filled = True
            job.completion_tokens = job.cap

        if job.endpoint == "embeddings":
            st.embedding_requests += 1
            st.embedding_inputs[job.n] += 1
            payload = embeddings_body(job, body)
        else:
            answer = compose(job, cfg, names, invalid_schema, filled)
            if job.stream:
                resp = await stream_chat(request, job, answer, headers, stream_fault, stream_after)
                self._done(job, scope, per_key)
                return resp
            payload = chat_body(job, answer) if job.endpoint == "chat" else responses_body(job, body, answer)
        data = orjson.dumps(payload)
        self._done(job, scope, per_key)
        if stream_fault is not None:
            return await broken_json(request, data, headers, stream_fault)
        return web.Response(body=data, status=200, headers=headers, content_type="application/json")

    def _done(self, job: Job, scope: Scope, per_key: list[int] | None) -> None:
        st = self._stats
        st.ok += 1
        st.prompt_tokens += job.prompt_tokens
        st.completion_tokens += job.completion_tokens * job.n
        per_model = st.per_model.get(job.model)  # absent when /stats/reset came while this was in flight
        if per_model is not None:
            per_model[1] += 1
        if per_key is not None:
            per_key[1] += 1
        if self._dialect.settles:
            scope.settle(job, self._clock())

    def _drop(self, request: web.Request) -> web.StreamResponse:
        self._stats.dropped += 1
        if request.transport is not None:
            request.transport.close()
        # Nothing reaches the client: aiohttp's write of this response fails on the closed
        # transport and is ignored as a client disconnection.
        return web.Response(status=500)

    def _server_error(self, status: int, headers: dict[str, str]) -> web.StreamResponse:
        self._stats.server_errors += 1
        return error_response(status, _SERVER_ERRORS[status], "server_error", None, None, headers)

    # -- capacity ----------------------------------------------------------------------------------

    async def _acquire(self) -> bool:
        """Take a processing slot, waiting in line if all are busy; False when the line is full."""
        cfg = self.config
        assert cfg.capacity is not None
        if self._in_flight < cfg.capacity and not self._waiters:
            self._in_flight += 1
            return True
        if cfg.max_queue is not None and len(self._waiters) >= cfg.max_queue:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        st = self._stats
        st.max_queued = max(st.max_queued, len(self._waiters))
        try:
            await waiter  # _release hands its slot over
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over as the client went away: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        return True

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_flight -= 1


def _flex_unavailable(headers: dict[str, str]) -> web.Response:
    # Documented as "429 Resource Unavailable" (not charged); the exact body was not found, so the code names it.
    return error_response(429, _FLEX_UNAVAILABLE, "resource_unavailable", None, "resource_unavailable", headers)


def _quota(headers: dict[str, str]) -> web.Response:
    message = "You exceeded your current quota, please check your plan and billing details."
    return error_response(429, message, "insufficient_quota", None, "insufficient_quota", headers)


async def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run a MockServer until cancelled; print its base URL to stderr once it listens."""
    async with MockServer(config, host, port) as server:
        print(f"mock OpenAI server listening on {server.base_url}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
