"""The exceptions scheduler raises, all rooted at :class:`SchedulerError`, and every error code a result can carry.

::

    SchedulerError
    ├── ConfigurationError          bad arguments to Pool/submit, unknown endpoint, unusable input
    ├── PoolClosed                  submit() on a pool that is not running
    └── JobError                    one job failed; ``.result`` is its error Result
        ├── RequestRejected         the API refused the request itself (400, 404, 413, 422, x-should-retry: false)
        ├── RequestTooLarge         the request alone needs more tokens than the whole token limit or context window
        ├── RetriesExhausted        retryable failures (5xx, timeouts, dropped connections) up to max_attempts,
        │                           or 429s for longer than max_rate_limited_s
        ├── InvalidResponse         the API kept answering 200 with a body that is not its answer (HTML, wrong shape)
        ├── OutputInvalid           a structured output did not parse into its response format (after parse_retries)
        ├── StreamIncomplete        a stream broke off after its first delta was delivered
        ├── DeadlineExceeded        the job's deadline passed before it succeeded
        ├── InternalError           an unexpected exception on the job's path (a bug, a failing sink)
        ├── BatchFailed             the Batch API failed the whole batch holding the job (its input file was refused)
        └── RunStopped              a run-fatal error stopped all admission; the job was not (or not fully) run
            ├── QuotaExhausted      429 insufficient_quota or a billing code: retrying cannot help
            ├── AuthenticationFailed 401/403: the API key was refused
            ├── BudgetExhausted     the pool's spending budget would be passed
            └── LimiterUnavailable  the shared limit (Redis) stayed unreachable past its grace period

A failed job never kills a worker: it becomes an error :class:`~scheduler.Result` whose ``error.code`` is the
class's ``code``, which ``submit()`` raises as the matching ``JobError`` (or returns, with ``raise_errors=False``).
Two more codes name records that no exception stands for: :data:`INVALID_REQUEST` (a bulk-run input line that is
not a request) and :data:`DEAD_LETTERED` (a distributed request that kept failing its workers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Result

__all__ = [
    "DEAD_LETTERED",
    "INVALID_REQUEST",
    "STOPPED_CODES",
    "AuthenticationFailed",
    "BatchFailed",
    "BudgetExhausted",
    "ConfigurationError",
    "DeadlineExceeded",
    "InternalError",
    "InvalidResponse",
    "JobError",
    "LimiterUnavailable",
    "OutputInvalid",
    "PoolClosed",
    "QuotaExhausted",
    "RequestRejected",
    "RequestTooLarge",
    "RetriesExhausted",
    "RunStopped",
    "SchedulerError",
    "StreamIncomplete",
    "error_for",
]


class SchedulerError(Exception):
    """Root of every exception scheduler raises."""


class ConfigurationError(SchedulerError, ValueError):
    """Raised when arguments or input cannot be used (a bad limit, an unknown endpoint, a malformed request)."""


class PoolClosed(SchedulerError):
    """Raised when a job is submitted to a pool that has not been entered or is shutting down."""


class JobError(SchedulerError):
    """Raised by ``submit()`` when its job failed. ``result`` is the job's error Result."""

    #: error code used in the job's error record
    code = "job_failed"

    def __init__(self, message: str, result: Result | None = None) -> None:
        super().__init__(message)
        self.result = result


class RequestRejected(JobError):
    """Raised when the API rejected the request itself (400, 404, 413, 422): retrying cannot help."""

    code = "request_rejected"


class RequestTooLarge(JobError):
    """Raised when a request's token estimate exceeds the whole token limit (or the model's context window), so
    it could never be admitted."""

    code = "request_too_large"


class RetriesExhausted(JobError):
    """Raised when a job failed with retryable errors on every one of its ``max_attempts``, or kept meeting 429s
    for longer than the pool's ``max_rate_limited_s``."""

    code = "retries_exhausted"


class InvalidResponse(JobError):
    """Raised when the API answered 200 with a body that is not its answer (an HTML page from a proxy, JSON of
    another shape) on every attempt."""

    code = "invalid_response"


class OutputInvalid(JobError):
    """Raised when the answer to a request for a structured output (``response_format=MyModel``) was not valid
    JSON or did not validate against the model, on the first attempt and on each of the ``parse_retries`` after
    it, or was cut at the output cap. ``result.body`` holds the last answer (``result.text`` its raw text)."""

    code = "output_invalid"


class StreamIncomplete(JobError):
    """Raised when a stream broke off (cut, ended without a finish reason, or an error event) after text was
    already delivered: it cannot be retried without repeating that text."""

    code = "stream_incomplete"


class DeadlineExceeded(JobError):
    """Raised when a job's deadline passed before it succeeded."""

    code = "deadline_exceeded"


class InternalError(JobError):
    """Raised when an unexpected exception (a bug, a transport or sink that raised) ended a job; the pool logs
    its traceback once and goes on serving other jobs."""

    code = "internal_error"


class BatchFailed(JobError):
    """Raised for the requests of a batch that the Batch API failed as a whole: its input file did not pass
    validation (``errors.data`` of the batch says why), so none of its requests ran."""

    code = "batch_failed"


class RunStopped(JobError):
    """Raised for jobs failed because a run-fatal error stopped admission for the whole pool."""

    code = "run_stopped"


class QuotaExhausted(RunStopped):
    """Raised when the API answered ``insufficient_quota`` (or a billing code): no retry can succeed."""

    code = "insufficient_quota"


class AuthenticationFailed(RunStopped):
    """Raised when the API refused the key (401) or the permission (403)."""

    code = "authentication_failed"


class BudgetExhausted(RunStopped):
    """Raised for jobs not admitted because their cost would take spending past the pool's budget."""

    code = "budget_exhausted"


class LimiterUnavailable(RunStopped):
    """Raised when the Redis holding a shared limit stayed unreachable past its grace period: without it the
    budget cannot be shared, so admission stops."""

    code = "limiter_unavailable"


#: a bulk-run input line that is not a request (its record says why, with the line number)
INVALID_REQUEST = "invalid_request"
#: a distributed request delivered too many times (it kept killing or failing its workers)
DEAD_LETTERED = "dead_lettered"

_JOB_ERRORS: dict[str, type[JobError]] = {
    cls.code: cls
    for cls in (
        RequestRejected, RequestTooLarge, RetriesExhausted, InvalidResponse, OutputInvalid, StreamIncomplete,
        DeadlineExceeded, InternalError, BatchFailed, RunStopped, QuotaExhausted, AuthenticationFailed,
        BudgetExhausted, LimiterUnavailable,
    )
}

#: codes of jobs a stop kept from running (or from finishing): a later run does them
STOPPED_CODES = frozenset(code for code, cls in _JOB_ERRORS.items() if issubclass(cls, RunStopped))


def error_for(result: Result) -> JobError:
    """The exception that stands for an error result (its class by ``result.error.code``)."""
    assert result.error is not None
    return _JOB_ERRORS.get(result.error.code, JobError)(result.error.message, result)
