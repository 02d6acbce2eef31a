"""Shaping a request before admission, and its answer after: structured outputs and context that fits.

Before admission (DESIGN section 8: "the estimate charged is the estimate of what is sent"), :func:`shape` turns
a model class given as ``response_format`` into the SDK's strict schema, checks the request against its model's
context window and, with a :class:`~scheduler.TrimPolicy`, drops the chat's oldest messages until it fits; then
it estimates the body that will be sent. After a successful answer, :meth:`Shape.conclude` parses a structured
output, asks again when it does not validate, and fails the job with ``output_invalid`` when asking again is
spent. A job that needs none of this has no :class:`Shape` (``job.shape`` is None): the common path pays only
the context-window check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from . import errors
from .results import ErrorInfo, Result
from .structured import Parsed, parse_answer
from .trim import ContextWindows, TrimPolicy, fit_request

if TYPE_CHECKING:
    from ._job import Job
    from .tokens import TokenEstimator

__all__ = ["Shape", "Shaping", "shape", "trim_policy"]

log = structlog.get_logger("scheduler")


@dataclass(frozen=True, slots=True)
class Shaping:
    """How requests are shaped: the pool's defaults, or one submit's."""

    #: drop the oldest messages of a chat that does not fit (None: refuse it at once)
    trim: TrimPolicy | None = None
    #: how many times an answer that does not parse into the response format is asked again
    parse_retries: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.parse_retries, bool) or not isinstance(self.parse_retries, int) or self.parse_retries < 0:
            raise errors.ConfigurationError(f"parse_retries must be an integer >= 0, got {self.parse_retries!r}")


def trim_policy(trim: bool | TrimPolicy | None) -> TrimPolicy | None:
    """The policy meant by ``trim=``: True the default policy, False or None none.

    Raises:
        ConfigurationError: ``trim`` is something else.
    """
    if trim is None or trim is False:
        return None
    if trim is True:
        return TrimPolicy()
    if isinstance(trim, TrimPolicy):
        return trim
    raise errors.ConfigurationError(f"trim must be True, False or a TrimPolicy, got {trim!r}")


class Shape:
    """What shaping did to one job, and what its answer must be.

    Internal: made by :func:`shape` for the jobs that need it, read by the attempts and the settler.
    """

    __slots__ = ("failures", "output", "refused", "retries", "spent_usd", "trimmed")

    def __init__(self, output: type | None, retries: int, trimmed: int, refused: str | None) -> None:
        #: the class to parse the answer into (None: nothing to parse)
        self.output = output
        #: answers that did not parse may be asked again this many times
        self.retries = retries
        #: how many of the chat's messages were dropped to fit
        self.trimmed = trimmed
        #: why the request cannot be sent (it does not fit its context window): the job fails at once
        self.refused = refused
        #: answers that did not parse so far
        self.failures = 0
        #: what the answers that did not parse cost, added to the final result's cost
        self.spent_usd = 0.0

    def conclude(self, job: Job, result: Result, now: float) -> Result | None:
        """The result to deliver for a successful answer: parsed, or an ``output_invalid`` failure; None when
        the answer did not parse and the job must be asked again (the caller requeues it). A job whose deadline
        has passed is not asked again."""
        if self.output is None:
            return result
        outcome = parse_answer(job.endpoint, result.body, self.output)
        if isinstance(outcome, Parsed):
            return dataclasses.replace(result, parsed=outcome.parsed, refusal=outcome.refusal,
                                       cost_usd=self._total(result.cost_usd))
        if outcome.retry and self.failures < self.retries and (job.deadline is None or now < job.deadline):
            self.failures += 1
            self.spent_usd += result.cost_usd or 0.0
            log.info("job_retrying", custom_id=job.custom_id, attempt=job.attempts, delay_s=0.0,
                     reason=f"output_invalid: {outcome.problem}")
            return None
        tries = f" ({self.failures + 1} answers)" if self.failures else ""
        message = f"{outcome.problem}{tries}"
        log.warning("job_failed", custom_id=job.custom_id, code=errors.OutputInvalid.code, attempt=job.attempts,
                    status=result.status, message=message)
        return dataclasses.replace(result, error=ErrorInfo(errors.OutputInvalid.code, message),
                                   cost_usd=self._total(result.cost_usd))

    def parses(self, endpoint: str, result: Result) -> Result | None:
        """``result`` (a cached answer) with its parsed output; None when it does not parse (it is not used)."""
        if self.output is None:
            return result
        outcome = parse_answer(endpoint, result.body, self.output)
        if not isinstance(outcome, Parsed):
            return None
        return dataclasses.replace(result, parsed=outcome.parsed, refusal=outcome.refusal)

    def _total(self, cost: float | None) -> float | None:
        return cost + self.spent_usd if cost is not None else (self.spent_usd or None)


def shape(
    endpoint: str, body: dict[str, Any], estimator: TokenEstimator, windows: ContextWindows, shaping: Shaping,
    output: type | None,
) -> tuple[dict[str, Any], int, Shape | None]:
    """Fit a request to its context window and estimate what will be sent.

    Args:
        endpoint: the API path.
        body: the body, its response format already converted (:func:`scheduler.structured.prepare_body`).
        estimator: counts the tokens.
        windows: the context windows by model.
        shaping: the trim policy and parse retries.
        output: the class to parse the answer into, if any.

    Returns:
        The body to send, its token estimate (prompt and output reservation), and the job's :class:`Shape`
        (None when nothing was done and nothing is to be parsed).
    """
    if shaping.trim is None and output is None:
        # The common case, decided without building a fit: no window, or room for the whole reservation.
        model = body.get("model")
        window = windows.window(model) if isinstance(model, str) else None
        prompt, reserved = estimator.prompt_tokens(endpoint, body), estimator.output_tokens(endpoint, body)
        if window is None or (window.max_input is None and window.per_input is None
                              and prompt + reserved <= window.tokens):
            return body, prompt + reserved, None
    try:
        fitted = fit_request(endpoint, body, estimator, windows, shaping.trim)
    except errors.RequestTooLarge as exc:
        return body, estimator.estimate(endpoint, body), Shape(output, shaping.parse_retries, 0, str(exc))
    if fitted.trimmed:
        # Counted again whole: the trimming subtracted message by message, and an estimator may count a body
        # otherwise (the CLI's, before its tokenizer is loaded).
        sent = dict(fitted.body)
        return sent, estimator.estimate(endpoint, sent), Shape(output, shaping.parse_retries, fitted.trimmed, None)
    estimate = fitted.prompt_tokens + estimator.output_tokens(endpoint, body)
    return body, estimate, Shape(output, shaping.parse_retries, 0, None) if output is not None else None

