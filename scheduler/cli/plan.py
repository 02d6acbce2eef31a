"""What a ``scheduler run`` is to do, checked before anything is sent: the parsed command line, shared by the
commands that plan, estimate and judge a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..limits import Limits
from .endpoints_file import EndpointEntry

__all__ = ["MOCK_RPM", "MOCK_TPM", "POLL_S", "Plan"]

# --mock without --rpm/--tpm: limits far above what one process sends.
MOCK_RPM = 30_000
MOCK_TPM = 50_000_000
# The default longest wait between two polls of running batches.
POLL_S = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run, checked before anything is sent (the parsed command line)."""

    input: Path
    output: Path
    model: str
    key: str
    base_url: str | None
    mock: bool
    rpm: int | None
    tpm: int | None
    workers: int
    max_attempts: int
    redis: str | None = None
    redis_grace_s: float = 30.0
    budget_usd: float | None = None
    prices: Path | None = None
    cache: str | None = None
    fallbacks: tuple[str, ...] = ()
    metrics_port: int | None = None
    rerun_changed: bool = False
    echo_requests: bool = False
    quiet: bool = False
    #: limits of particular models
    model_limits: tuple[tuple[str, Limits], ...] = ()
    #: standard, flex, batch or auto
    tier: str = "standard"
    #: the auto tier's deadline, as Unix time
    deadline_unix: float | None = None
    flex_fallback: str | None = None
    dry_run: bool = False
    #: requests per Batch API input file
    batch_size: int = 50_000
    #: the longest wait between two polls of running batches
    poll_s: float = POLL_S
    #: one-text embeddings lines queued together go out as one request
    coalesce: bool = True
    #: trim chats to fit their context window
    trim: bool = False
    #: the endpoints of --endpoints (empty: one, from --base-url and OPENAI_API_KEY)
    endpoints: tuple[EndpointEntry, ...] = ()
    #: --reserve: capacity held for urgent work, by priority
    reserve: tuple[tuple[int, float], ...] = ()
    #: the priority of input lines that give none
    priority: int = 0

    def online_limits(self) -> Limits | None:
        """The online limits of the run's model (its own --limit, else --rpm/--tpm, else the built-in mock's),
        None when none are known."""
        own = dict(self.model_limits).get(self.model)
        if own is not None:
            return own
        if self.rpm or self.tpm:
            return Limits(rpm=self.rpm, tpm=self.tpm)
        return Limits(rpm=MOCK_RPM, tpm=MOCK_TPM) if self.mock else None
