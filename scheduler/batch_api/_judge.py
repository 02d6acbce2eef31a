"""What a batch's output says about each of its lines: a success, a final failure, one to retry, or not run.

:func:`judge_part` walks an ended part's lines (the output file first, then the error file, then the lines the
files do not mention) and says for each one either its final :class:`~scheduler.Result` or that it needs another
batch, holding no more than the part's ids in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .. import errors
from ..cost import PriceTable
from ..logs import redact
from ..results import ErrorInfo, Result, Usage
from ..retry import Outcome, classify

__all__ = ["Ended", "Verdict", "ended_as", "judge_line", "judge_part"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one line of a batch's output or error file says about its request."""

    kind: Literal["ok", "fatal", "retry", "unrun"]
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ended:
    """What is known of an ended part when its lines are judged."""

    endpoint: str
    model: str
    batch_id: str | None
    #: seconds from the batch's creation to its end (each result's latency)
    latency_s: float
    #: why the whole batch failed (every line fails with it), or None
    failure: str | None
    #: cancelled by a cut-over: a line it did not run is retried without counting against the request
    stopped: bool


def ended_as(endpoint: str, model: str, end: Mapping[str, Any]) -> Ended:
    """How a journal's ``end`` record says a part's batch ended (see :mod:`._journal`)."""
    created, ended_at = end.get("created_at"), end.get("ended_at")
    failure = end.get("errors") if end["status"] == "failed" else None
    return Ended(
        endpoint=endpoint, model=model, batch_id=end.get("batch_id"),
        latency_s=float(ended_at - created) if created and ended_at else 0.0,
        failure=failure["message"] if isinstance(failure, Mapping) else None,
        stopped=bool(end.get("stopped")) and end["status"] == "cancelled",
    )


def judge_line(line: Mapping[str, Any] | None) -> Verdict:
    """What a batch output or error file line says (None: the files do not mention the request)."""
    if line is None:
        return Verdict("unrun", message="the batch ended without running it")
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        body = response.get("body")
        request_id = response.get("request_id")
        outcome = classify(status, {}, body)
        if outcome is Outcome.SUCCESS and not error:
            return Verdict("ok", status, body, request_id)
        message = _error_message(body) or f"HTTP {status}"
        kind: Literal["fatal", "retry"] = (
            "retry" if outcome in (Outcome.RETRY, Outcome.RATE_LIMITED, Outcome.SUCCESS) else "fatal"
        )
        return Verdict(kind, status, body, request_id, redact(message))
    code = error.get("code") if isinstance(error, dict) else None
    message = redact(str(error.get("message") or code)) if isinstance(error, dict) else "no response"
    if code in ("batch_expired", "batch_cancelled"):
        return Verdict("unrun", message=f"{code}: {message}")
    return Verdict("retry", message=f"{code}: {message}" if code else message)


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('code') or err.get('type')}: {err.get('message')}"
    return None


def judge_part(
    ended: Ended,
    ids: Callable[[], Iterable[str]],
    lines: Iterable[Mapping[str, Any]],
    *,
    attempt: Callable[[str], int],
    max_attempts: int,
    prices: PriceTable,
) -> Iterator[tuple[str, Result | None]]:
    """``(custom_id, final result)`` of each line of an ended part, or ``(custom_id, None)`` for a line that needs
    another batch.

    Args:
        ended: the part and how its batch ended.
        ids: reads the part's ids, in order (called twice at most).
        lines: the batch's output and error file lines, output first (a line answered twice: the first wins, so
            a success beats a failure).
        attempt: which batch of the request this one was (1 for its first).
        max_attempts: batches a request may go into before its failure is final.
        prices: for ``cost_usd``, at Batch API prices.
    """
    wanted = set(ids())  # bounded by the part's size, not the run's
    if ended.failure is not None:
        for custom_id in wanted_in_order(ids(), wanted):
            yield custom_id, _result(ended, custom_id, attempt(custom_id), status=None, body=None,
                                     error=ErrorInfo(errors.BatchFailed.code, ended.failure))
        return
    for line in lines:
        custom_id = line["custom_id"]
        if custom_id in wanted:
            wanted.discard(custom_id)
            yield custom_id, _final(ended, custom_id, judge_line(line), attempt(custom_id), max_attempts, prices)
    for custom_id in wanted_in_order(ids(), wanted):
        yield custom_id, _final(ended, custom_id, judge_line(None), attempt(custom_id), max_attempts, prices)


def wanted_in_order(ids: Iterable[str], wanted: set[str]) -> Iterator[str]:
    """The ids of ``ids`` (in their order) that are in ``wanted``."""
    if wanted:
        yield from (custom_id for custom_id in ids if custom_id in wanted)


def _final(
    ended: Ended, custom_id: str, verdict: Verdict, attempt: int, max_attempts: int, prices: PriceTable
) -> Result | None:
    if verdict.kind == "ok":
        usage = Usage.from_body(verdict.body)
        model = verdict.body.get("model") if isinstance(verdict.body, dict) else None
        model = model if isinstance(model, str) else ended.model
        return _result(ended, custom_id, attempt, status=verdict.status, body=verdict.body,
                       request_id=verdict.request_id, usage=usage, model=model,
                       cost_usd=prices.cost(model, usage, tier="batch"))
    if verdict.kind == "fatal":
        return _result(ended, custom_id, attempt, status=verdict.status, body=verdict.body,
                       request_id=verdict.request_id, error=ErrorInfo(errors.RequestRejected.code, verdict.message))
    if (verdict.kind == "unrun" and ended.stopped) or attempt < max_attempts:
        return None  # another batch; a cut-over's cancel does not count against the request
    message = f"failed in {attempt} batches; the last: {verdict.message}"
    return _result(ended, custom_id, attempt, status=verdict.status, body=verdict.body,
                   request_id=verdict.request_id, error=ErrorInfo(errors.RetriesExhausted.code, message))


def _result(ended: Ended, custom_id: str, attempt: int, *, model: str | None = None, **fields: Any) -> Result:
    return Result(custom_id=custom_id, endpoint=ended.endpoint, attempts=attempt, latency_s=ended.latency_s,
                  model=model or ended.model, tier="batch", batch_id=ended.batch_id, **fields)
