"""Configuration of the mock's Batch API (``MockConfig.batch``) and its command-line arguments.

The Batch API of the mock runs in accelerated time: a batch validates, runs its lines at ``lines_per_s`` and
finalizes within a second or a few, instead of minutes to 24 hours, so a whole batch run finishes offline in
seconds. Faults are configured here (shares of lines failing, a short completion window, the organisation's
enqueued-token limit) or scripted per test on :class:`~scheduler.mock.batches.BatchMock`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["BatchMockConfig", "add_batch_arguments", "batch_config_from_args"]


@dataclass(frozen=True, slots=True)
class BatchMockConfig:
    """How the mock's Batch API paces, limits and fails batches."""

    #: seconds each of validating, finalizing and cancelling takes
    step_s: float = 0.05
    #: lines of a batch answered per second once it is in progress
    lines_per_s: float = 2_000.0
    #: the completion window: a batch unfinished this many seconds after its creation expires (OpenAI: 24 h)
    window_s: float = 86_400.0
    #: share of lines answered with a 500 (written to the error file with their response)
    error_rate: float = 0.0
    #: share of lines failed with ``request_timeout`` (written to the error file without a response)
    timeout_rate: float = 0.0
    #: the organisation's enqueued prompt tokens per model; a batch past it fails with ``token_limit_exceeded``
    enqueued_token_limit: int | None = None
    #: requests one input file may hold (OpenAI: 50,000)
    max_requests: int = 50_000
    #: bytes one batch input file may hold (OpenAI: 200 MB)
    max_bytes: int = 200 * 2**20

    def __post_init__(self) -> None:
        if self.step_s < 0 or self.lines_per_s <= 0 or self.window_s <= 0:
            raise ValueError("batch step_s must be >= 0, lines_per_s and window_s > 0")
        for name in ("error_rate", "timeout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"batch {name} must be within [0, 1]")
        if self.enqueued_token_limit is not None and self.enqueued_token_limit < 1:
            raise ValueError("batch enqueued_token_limit must be >= 1 or None")
        if self.max_requests < 1 or self.max_bytes < 1:
            raise ValueError("batch max_requests and max_bytes must be >= 1")


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the BatchMockConfig options to ``parser``, as ``--batch-*``."""
    d = BatchMockConfig()
    g = parser.add_argument_group("mock Batch API")
    g.add_argument("--batch-step-s", type=float, default=d.step_s, metavar="SECONDS",
                   help=f"seconds each of validating, finalizing and cancelling takes (default {d.step_s:g})")
    g.add_argument("--batch-lines-per-s", type=float, default=d.lines_per_s, metavar="N",
                   help=f"lines of a batch answered per second (default {d.lines_per_s:g})")
    g.add_argument("--batch-window-s", type=float, default=d.window_s, metavar="SECONDS",
                   help=f"completion window: unfinished batches expire after it (default {d.window_s:g})")
    g.add_argument("--batch-error-rate", type=float, default=d.error_rate,
                   help="share of batch lines answered 500 (default 0)")
    g.add_argument("--batch-timeout-rate", type=float, default=d.timeout_rate,
                   help="share of batch lines failed with request_timeout (default 0)")
    g.add_argument("--batch-token-limit", type=int, default=d.enqueued_token_limit, metavar="TOKENS",
                   help="enqueued prompt tokens per model; batches past it fail with token_limit_exceeded")
    g.add_argument("--batch-max-requests", type=int, default=d.max_requests, metavar="N",
                   help=f"requests one batch input file may hold (default {d.max_requests:,})")


def batch_config_from_args(args: argparse.Namespace) -> BatchMockConfig:
    """Build a BatchMockConfig from arguments added by add_batch_arguments (defaults where absent)."""
    d = BatchMockConfig()
    return BatchMockConfig(
        step_s=getattr(args, "batch_step_s", d.step_s),
        lines_per_s=getattr(args, "batch_lines_per_s", d.lines_per_s),
        window_s=getattr(args, "batch_window_s", d.window_s),
        error_rate=getattr(args, "batch_error_rate", d.error_rate),
        timeout_rate=getattr(args, "batch_timeout_rate", d.timeout_rate),
        enqueued_token_limit=getattr(args, "batch_token_limit", d.enqueued_token_limit),
        max_requests=getattr(args, "batch_max_requests", d.max_requests),
    )
