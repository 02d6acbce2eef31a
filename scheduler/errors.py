"""The exceptions scheduler raises, all rooted at :class:`SchedulerError`.

::

    SchedulerError
    ├── ConfigurationError          bad arguments to Pool/submit, unknown endpoint, unusable input
    ├── PoolClosed                  submit() on a pool that is not running
    └── JobError                    one job failed; ``.result`` is its error Result
        ├── RequestRejected         the API refused the request itself (400, 404, 413, 422, x-should-retry: false)
        ├── RequestTooLarge         the request alone needs more tokens than the whole token limit
        ├── RetriesExhausted        retryable failures (429, 5xx, timeouts, dropped connections) up to max_attempts
        ├── DeadlineExceeded        the job's deadline passed before it succeeded
        ├── BatchFailed             the Batch API failed the whole batch holding the job (its input file was refused)
        └── RunStopped              a run-fatal error stopped all admission; the job was not (or not fully) run
            ├── QuotaExhausted      429 insufficient_quota or a billing code: retrying cannot help
            ├── AuthenticationFailed 401/403: the API key was refused
            └── BudgetExhausted     the pool's spending budget would be passed

A failed job never kills a worker: it becomes an error :class:`~scheduler.Result`, which ``submit()`` raises as
the matching ``JobError`` (or returns, with ``raise_errors=False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Result

__all__ = [
    "AuthenticationFailed",
    "BatchFailed",
    "BudgetExhausted",
    "ConfigurationError",
    "DeadlineExceeded",
    "JobError",
    "PoolClosed",
    "QuotaExhausted",
    "RequestRejected",
    "RequestTooLarge",
    "RetriesExhausted",
    "RunStopped",
    "SchedulerError",
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
    """Raised when a request's token estimate exceeds the whole token limit, so it could never be admitted."""

    code = "request_too_large"


class RetriesExhausted(JobError):
    """Raised when a job failed with retryable errors on every one of its ``max_attempts``."""

    code = "retries_exhausted"


class DeadlineExceeded(JobError):
    """Raised when a job's deadline passed before it succeeded."""

    code = "deadline_exceeded"


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
