"""The mock's Files and Batches APIs: upload a JSONL file, run it as a batch in accelerated time, download results.

Routes (:meth:`BatchMock.add_routes`), shaped as the openai SDK's types say (``FileObject``, ``FileDeleted``,
``Batch`` with ``BatchRequestCounts``, ``BatchError`` and ``BatchUsage``, cursor pages)::

    POST   /v1/files                 multipart upload; purpose "batch" needs a .jsonl file of at most max_bytes
    GET    /v1/files                 list: purpose, order, after, limit
    GET    /v1/files/{id}            one FileObject
    GET    /v1/files/{id}/content    the file's bytes
    DELETE /v1/files/{id}            FileDeleted
    POST   /v1/batches               create: input_file_id, endpoint, completion_window "24h", metadata
    GET    /v1/batches               list, newest first: after, limit
    GET    /v1/batches/{id}          one Batch
    POST   /v1/batches/{id}/cancel   cancelling, then cancelled

A batch lives in the server's loop time, accelerated (:class:`~scheduler.mock.batch_config.BatchMockConfig`):
``validating`` for ``step_s``; then the input is validated as OpenAI does (every line a JSON request with a unique
``custom_id``, method POST, the batch's endpoint as ``url``, one model; at most ``max_requests`` lines) and checked
against the organisation's enqueued-token limit, either of which ends it ``failed`` with ``errors.data``; else
``in_progress``, its lines answered at ``lines_per_s`` by the same code that answers online requests (without the
online rate limits: the Batch API has its own); ``finalizing`` for ``step_s``; ``completed``, with an output file
(lines answered 2xx) and an error file (the rest). A batch still unfinished ``window_s`` after its creation goes
``expired``: the lines answered so far are kept, the others are written to the error file as ``batch_expired``,
as OpenAI's batch guide shows. ``cancel`` makes it ``cancelling`` for ``step_s``, then ``cancelled``, keeping the
lines answered before the cancel and writing the others as ``batch_cancelled``.

Nothing runs in the background: every request first applies the transitions that came due since the last one,
in time order, so the enqueued-token check of a batch sees exactly the batches running at its validation.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from .batch_records import Answer, Batch, File, metadata_problem
from .config import MockConfig
from .parse import BadRequest, Job, parse_chat, parse_embeddings, parse_responses
from .render import chat_body, compose, embeddings_body, responses_body
from .respond import bad_request, cursor_page, error_response, invalid_key, ok, request_id

__all__ = ["BatchMock"]

_ORG = "org-mock"
_FILE_PURPOSES = frozenset(
    {"assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results", "vision",
     "user_data", "evals"}
)
_OPEN = ("validating", "in_progress", "finalizing", "cancelling")
# Batch statuses holding enqueued tokens: validated and not yet ended.
_ENQUEUED = ("in_progress", "finalizing", "cancelling")
_LINE_ERRORS = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "request_timeout": "The request timed out.",
}
_STATUS_ERRORS = {
    400: ("invalid_request_error", "The request could not be processed."),
    404: ("invalid_request_error", "The model does not exist or you do not have access to it."),
    429: ("requests", "Rate limit reached."),
    500: ("server_error", "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", "Bad gateway."),
    503: ("server_error", "The engine is currently overloaded, please try again later."),
}
# The renderers read the request only to stream; batch lines never stream (refused before rendering).

#: a scripted outcome of one line: an HTTP status answered with an error body, or an error code without a response
LineOutcome = int | str


class BatchMock:
    """The Files and Batches APIs of a :class:`~scheduler.mock.MockServer` (``server.batches``), with counters
    and scripted faults for tests.

    Args:
        config: the server's configuration (``config.batch`` paces and fails batches; the rest answers lines).
        now: the server's clock (loop time).
    """

    def __init__(self, config: MockConfig, now: Callable[[], float]) -> None:
        self.config = config
        self._now = now
        self._rng = random.Random(config.seed)
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}"
        self._files: dict[str, File] = {}
        self._batches: dict[str, Batch] = {}
        self._wall_offset: float | None = None
        self._scripts: dict[str, deque[LineOutcome]] = {}
        self._expire_next: deque[int] = deque()
        self._refuse_next = 0
        #: ``POST /v1/batches`` calls that created a batch
        self.creates = 0
        #: files uploaded
        self.uploads = 0
        #: ``POST /v1/batches/{id}/cancel`` calls that cancelled a batch
        self.cancels = 0

    # -- scripted faults ---------------------------------------------------------------------------

    def script_line(self, custom_id: str, *outcomes: LineOutcome) -> None:
        """Answer the next executions of the line ``custom_id`` (in any batch) with ``outcomes``, one each: an
        HTTP status (its error body, e.g. 500) or an error code without a response (e.g. ``"request_timeout"``).
        Executions after these are answered normally."""
        self._scripts.setdefault(custom_id, deque()).extend(outcomes)

    def expire_next(self, after_lines: int = 0, count: int = 1) -> None:
        """Make the next ``count`` batches created expire once ``after_lines`` of their lines are answered."""
        self._expire_next.extend([after_lines] * count)

    def refuse_next(self, count: int = 1) -> None:
        """Fail the next ``count`` batches created with ``token_limit_exceeded``, whatever their tokens."""
        self._refuse_next += count

    def batch_ids(self) -> list[str]:
        """Ids of every batch created, oldest first."""
        return list(self._batches)

    # -- routes -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the Files and Batches routes on ``app`` (before any catch-all route)."""
        r = app.router
        r.add_post("/v1/files", self._upload)
        r.add_get("/v1/files", self._list_files)
        r.add_get("/v1/files/{file_id}", self._get_file)
        r.add_get("/v1/files/{file_id}/content", self._file_content)
        r.add_delete("/v1/files/{file_id}", self._delete_file)
        r.add_post("/v1/batches", self._create)
        r.add_get("/v1/batches", self._list_batches)
        r.add_get("/v1/batches/{batch_id}", self._get_batch)
        r.add_post("/v1/batches/{batch_id}/cancel", self._cancel)

    def _denied(self, request: web.Request) -> web.Response | None:
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return invalid_key({"x-request-id": request_id()})
        return None

    def _unix(self, t: float) -> int:
        """Unix seconds of loop time ``t``."""
        if self._wall_offset is None:
            self._wall_offset = time.time() - self._now()
        return int(self._wall_offset + t)

    # -- files ------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if request.content_type != "multipart/form-data":
            return bad_request("Invalid Content-Type header: expected multipart/form-data.")
        purpose: str | None = None
        filename = "file"
        data: bytes | None = None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = await part.text()
            elif part.name == "file":
                filename = part.filename or filename
                data = bytes(await part.read(decode=False))
        if data is None:
            return bad_request("Missing required parameter: 'file'.", "file", "missing_required_parameter")
        if purpose is None:
            return bad_request("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if purpose not in _FILE_PURPOSES:
            return bad_request(f"Invalid value for 'purpose': {purpose!r}.", "purpose", "invalid_value")
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                return bad_request("Invalid file format for Batch API. Must be .jsonl", "file", "invalid_file_format")
            limit = self.config.batch.max_bytes
            if len(data) > limit:
                message = f"The file is {len(data):,} bytes: the Batch API takes files of at most {limit:,} bytes."
                return bad_request(message, "file", "file_too_large")
        file = self._add_file(filename, purpose, data)
        self.uploads += 1
        return ok(file.obj())

    def _add_file(self, filename: str, purpose: str, data: bytes) -> File:
        file = File("file-" + os.urandom(12).hex(), filename, purpose, data, self._unix(self._now()))
        self._files[file.id] = file
        return file

    async def _list_files(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        q = request.query
        files = [f for f in self._files.values() if q.get("purpose") in (None, f.purpose)]
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            return bad_request(f"Invalid value for 'order': {order!r}.", "order", "invalid_value")
        if order == "desc":
            files.reverse()
        return cursor_page([f.obj() for f in files], q, default_limit=10_000, max_limit=10_000)

    def _file(self, request: web.Request) -> File | web.Response:
        file_id = request.match_info["file_id"]
        file = self._files.get(file_id)
        if file is None:
            return error_response(404, f"No such File object: {file_id}", "invalid_request_error", "id", None,
                                  {"x-request-id": request_id()})
        return file

    async def _get_file(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        file = self._file(request)
        return file if isinstance(file, web.Response) else ok(file.obj())

    async def _file_content(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        file = self._file(request)
        if isinstance(file, web.Response):
            return file
        return web.Response(body=file.data, content_type="application/octet-stream",
                            headers={"x-request-id": request_id()})

    async def _delete_file(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        file = self._file(request)
        if isinstance(file, web.Response):
            return file
        del self._files[file.id]
        return ok({"id": file.id, "object": "file", "deleted": True})

    # -- batches ----------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return bad_request("We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return bad_request("The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return bad_request(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
        if body["completion_window"] != "24h":
            return bad_request(f"Invalid value for 'completion_window': {body['completion_window']!r}. Supported "
                               "values are: '24h'.", "completion_window", "invalid_value")
        endpoint = body["endpoint"]
        if endpoint not in _PARSERS:
            return bad_request(f"Invalid value for 'endpoint': {endpoint!r}. The mock serves batches for "
                        f"{', '.join(sorted(_PARSERS))}.", "endpoint", "invalid_value")
        metadata = body.get("metadata")
        if (problem := metadata_problem(metadata)) is not None:
            return bad_request(problem, "metadata", "invalid_value")
        file = self._files.get(body["input_file_id"])
        if file is None:
            return bad_request(f"No such File object: {body['input_file_id']}", "input_file_id", "invalid_value")
        if file.purpose != "batch":
            return bad_request(f"The input file {file.id} has purpose {file.purpose!r}: batches need purpose 'batch'.",
                        "input_file_id", "invalid_value")
        now = self._now()
        await self._advance(now)
        created_at = self._unix(now)
        batch = Batch(
            id="batch_" + os.urandom(12).hex(), input_file_id=file.id, endpoint=endpoint, metadata=metadata,
            created=now, created_at=created_at, expires_at=created_at + math.ceil(self.config.batch.window_s),
            rate=self.config.batch.lines_per_s, next_at=now + self.config.batch.step_s,
        )
        if self._expire_next:
            batch.expire_after = self._expire_next.popleft()
        if self._refuse_next:
            self._refuse_next -= 1
            batch.refuse = True
        self._batches[batch.id] = batch
        self.creates += 1
        return ok(self._batch_obj(batch, now))

    async def _list_batches(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        now = self._now()
        await self._advance(now)
        batches = [self._batch_obj(b, now) for b in reversed(self._batches.values())]
        return cursor_page(batches, request.query, default_limit=20, max_limit=100)

    def _batch(self, request: web.Request) -> Batch | web.Response:
        batch_id = request.match_info["batch_id"]
        batch = self._batches.get(batch_id)
        if batch is None:
            return error_response(404, f"No batch found with id '{batch_id}'.", "invalid_request_error", "batch_id",
                                  None, {"x-request-id": request_id()})
        return batch

    async def _get_batch(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        now = self._now()
        await self._advance(now)
        batch = self._batch(request)
        return batch if isinstance(batch, web.Response) else ok(self._batch_obj(batch, now))

    async def _cancel(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        now = self._now()
        await self._advance(now)
        batch = self._batch(request)
        if isinstance(batch, web.Response):
            return batch
        if batch.status in ("validating", "in_progress", "finalizing"):
            # Lines answered so far are kept; the cancel takes step_s, like OpenAI's "up to 10 minutes".
            batch.done = batch.answered(now)
            batch.status = "cancelling"
            batch.times["cancelling_at"] = self._unix(now)
            batch.next_step, batch.next_at = "cancel", now + self.config.batch.step_s
            self.cancels += 1
        elif batch.status != "cancelling":
            return bad_request(f"Cannot cancel a batch with status '{batch.status}'.", "batch_id", "invalid_value")
        return ok(self._batch_obj(batch, now))

    # -- a batch's life ---------------------------------------------------------------------------

    async def _advance(self, now: float) -> None:
        """Apply every transition due by ``now``, earliest first."""
        while True:
            due = [b for b in self._batches.values() if b.next_step is not None and b.next_at <= now]
            if not due:
                return
            batch = min(due, key=lambda b: b.next_at)
            await self._step(batch)

    async def _step(self, batch: Batch) -> None:
        t = batch.next_at
        step, batch.next_step = batch.next_step, None
        cfg = self.config.batch
        if step == "validate":
            await self._start(batch, t)
        elif step == "finalize":
            batch.status = "finalizing"
            batch.times["finalizing_at"] = self._unix(t)
            batch.done = len(batch.requests)
            batch.next_step, batch.next_at = "complete", t + cfg.step_s
        elif step == "complete":
            self._end(batch, "completed", t, "")
        elif step == "expire":
            batch.done = batch.answered(t)
            self._end(batch, "expired", t, "batch_expired")
        elif step == "cancel":
            self._end(batch, "cancelled", t, "batch_cancelled")

    async def _start(self, batch: Batch, t: float) -> None:
        """Validate the input file; then fail the batch, or answer its lines and start it."""
        file = self._files.get(batch.input_file_id)
        errors = self._validate(batch, file.data if file is not None else None)
        if not errors and (batch.refuse or self._over_token_limit(batch)):
            limit = self.config.batch.enqueued_token_limit
            errors = [_batch_error(
                "token_limit_exceeded",
                f"Enqueued token limit reached for {batch.model} in organization {_ORG}. Limit: "
                f"{limit or batch.tokens:,} enqueued tokens. Please try again once some in_progress batches have "
                "been completed.",
            )]
        if errors:
            batch.status = "failed"
            batch.errors = errors
            batch.times["failed_at"] = self._unix(t)
            return
        batch.answers = [await self._answer(batch.endpoint, custom_id, body) for custom_id, body in batch.requests]
        batch.status = "in_progress"
        batch.times["in_progress_at"] = self._unix(t)
        batch.started = t
        n = len(batch.requests)
        finish = t + n / batch.rate
        expire = batch.created + self.config.batch.window_s
        if batch.expire_after is not None and batch.expire_after < n:
            expire = min(expire, t + batch.expire_after / batch.rate)
        if finish <= expire:
            batch.next_step, batch.next_at = "finalize", finish
        else:
            batch.next_step, batch.next_at = "expire", expire

    def _validate(self, batch: Batch, data: bytes | None) -> list[dict[str, Any]]:
        """OpenAI's checks of an input file; fills ``batch.requests``, ``model`` and ``tokens`` as it goes."""
        if data is None:
            return [_batch_error("invalid_file", f"The input file {batch.input_file_id} no longer exists.")]
        lines = [line for line in data.splitlines() if line.strip()]
        if not lines:
            return [_batch_error("empty_file", "The batch input file is empty.")]
        limit = self.config.batch.max_requests
        if len(lines) > limit:
            return [_batch_error("too_many_tasks", f"The batch input file has {len(lines):,} requests; a batch takes "
                                 f"at most {limit:,}.")]
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(lines, 1):
            problem = self._line_problem(batch, raw, seen)
            if problem is not None:
                errors.append({**problem, "line": number})
                if len(errors) >= 20:
                    break
        if errors:
            batch.requests = []
        return errors

    def _line_problem(self, batch: Batch, raw: bytes, seen: set[str]) -> dict[str, Any] | None:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _batch_error("invalid_json_line", "This line is not parseable as valid JSON.")
        if not isinstance(line, dict):
            return _batch_error("invalid_json_line", "This line is not a JSON object.")
        for name in ("custom_id", "method", "url", "body"):
            if name not in line:
                return _batch_error("missing_required_parameter", f"Missing required parameter: '{name}'.", name)
        custom_id, body = line["custom_id"], line["body"]
        if not isinstance(custom_id, str) or not custom_id:
            return _batch_error("invalid_value", "custom_id must be a non-empty string.", "custom_id")
        if custom_id in seen:
            return _batch_error("duplicate_custom_id", "The custom_id for this request is a duplicate of another "
                                "request. The custom_id parameter must be unique for each request in a batch.",
                                "custom_id")
        seen.add(custom_id)
        if line["method"] != "POST":
            return _batch_error("invalid_value", f"Invalid method {line['method']!r}: only POST is supported.",
                                "method")
        if line["url"] != batch.endpoint:
            return _batch_error("url_mismatch", f"The URL provided for this request ({line['url']!r}) does not "
                                f"match the batch endpoint ({batch.endpoint!r}).", "url")
        if not isinstance(body, dict):
            return _batch_error("invalid_value", "body must be a JSON object.", "body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _batch_error("missing_required_parameter", "Missing required parameter: 'body.model'.",
                                "body.model")
        if batch.model is None:
            batch.model = model
        elif model != batch.model:
            return _batch_error("model_mismatch", f"The model {model!r} of this request does not match the model "
                                f"{batch.model!r} of the requests before it: a batch takes requests for one model.",
                                "body.model")
        parse = _PARSERS[batch.endpoint]
        with contextlib.suppress(BadRequest):  # such a line is answered 400 in its turn, as OpenAI does
            batch.tokens += parse(body, self.config).prompt_tokens
        batch.requests.append((custom_id, body))
        return None

    def _over_token_limit(self, batch: Batch) -> bool:
        limit = self.config.batch.enqueued_token_limit
        if limit is None:
            return False
        enqueued = sum(b.tokens for b in self._batches.values() if b.model == batch.model and b.status in _ENQUEUED)
        return enqueued + batch.tokens > limit

    async def _answer(self, endpoint: str, custom_id: str, body: dict[str, Any]) -> Answer:
        """Answer one line: a scripted or random fault, else the online mock's answer."""
        outcome: LineOutcome | None = None
        script = self._scripts.get(custom_id)
        if script:
            outcome = script.popleft()
        else:
            cfg = self.config.batch
            draw = self._rng.random()
            if draw < cfg.error_rate:
                outcome = 500
            elif draw < cfg.error_rate + cfg.timeout_rate:
                outcome = "request_timeout"
        if isinstance(outcome, str):
            return Answer(custom_id, None, error={"code": outcome, "message": _LINE_ERRORS.get(outcome, outcome)})
        if outcome is not None:
            kind, message = _STATUS_ERRORS.get(outcome, ("server_error", f"HTTP {outcome}."))
            return Answer(custom_id, outcome, _error_body(message, kind))
        if body.get("stream"):
            return Answer(custom_id, 400, _error_body("Streaming is not supported in the Batch API.",
                                                       "invalid_request_error", "stream", "unsupported_value"))
        try:
            job = _PARSERS[endpoint](body, self.config)
        except BadRequest as exc:
            return Answer(custom_id, 400, _error_body(exc.message, "invalid_request_error", exc.param, exc.code))
        return Answer(custom_id, 200, _answer_body(job, body, self.config), None, job.prompt_tokens,
                       job.completion_tokens * job.n)

    def _end(self, batch: Batch, status: str, t: float, remainder_code: str) -> None:
        """End ``batch``: its output and error files, the lines it did not answer written as ``remainder_code``."""
        done = batch.answered(t) if batch.done is None else batch.done
        batch.done = done
        answered = batch.answers[:done]
        output = [a.line() for a in answered if a.ok]
        failed = [a.line() for a in answered if not a.ok]
        if remainder_code:
            message = _LINE_ERRORS[remainder_code]
            failed.extend(
                Answer(custom_id, None, error={"code": remainder_code, "message": message}).line()
                for custom_id, _ in batch.requests[done:]
            )
        if output:
            batch.output_file_id = self._add_file(f"{batch.id}_output.jsonl", "batch_output", _jsonl(output)).id
        if failed:
            batch.error_file_id = self._add_file(f"{batch.id}_error.jsonl", "batch_output", _jsonl(failed)).id
        batch.status = status
        batch.times[f"{status}_at"] = self._unix(t)

    def _batch_obj(self, batch: Batch, now: float) -> dict[str, Any]:
        """The Batch object as ``GET /v1/batches/{id}`` returns it."""
        total = len(batch.requests)
        done = batch.answered(now)
        answered = batch.answers[:done]
        completed = sum(1 for a in answered if a.ok)
        failed = done - completed
        if batch.status in ("expired", "cancelled"):
            failed += total - done  # the lines written to the error file unanswered
        prompt = sum(a.prompt_tokens for a in answered if a.ok)
        output = sum(a.completion_tokens for a in answered if a.ok)
        times = batch.times
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "in_progress_at": times.get("in_progress_at"),
            "expires_at": batch.expires_at,
            "finalizing_at": times.get("finalizing_at"),
            "completed_at": times.get("completed_at"),
            "failed_at": times.get("failed_at"),
            "expired_at": times.get("expired_at"),
            "cancelling_at": times.get("cancelling_at"),
            "cancelled_at": times.get("cancelled_at"),
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "metadata": batch.metadata,
            "model": batch.model,
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output,
            },
        }


# -- helpers ---------------------------------------------------------------------------------------


#: the endpoints a batch may target, with the online mock's parser of each
_PARSERS = {"/v1/chat/completions": parse_chat, "/v1/embeddings": parse_embeddings, "/v1/responses": parse_responses}


def _answer_body(job: Job, body: dict[str, Any], config: MockConfig) -> dict[str, Any]:
    """The online mock's answer to a line, as its body."""
    if job.endpoint == "embeddings":
        return embeddings_body(job, body)
    answer = compose(job, config, frozenset(), False, config.fill_output_cap)
    return chat_body(job, answer) if job.endpoint == "chat" else responses_body(job, body, answer)


def _batch_error(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": None}


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE) for line in lines)
