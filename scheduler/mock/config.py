"""Configuration of the mock server and its command-line arguments."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .batch_config import BatchMockConfig, add_batch_arguments, batch_config_from_args


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock server limits, delays and fails requests."""

    rpm: int | None = 10_000  # None: no request limit
    tpm: int | None = 2_000_000  # None: no token limit
    quantum_s: float = 1.0  # burst window: the enforcing buckets hold quantum_s worth of the limit
    latency_ms: float = 0.0  # median latency of a response
    latency_sigma: float = 0.0  # lognormal sigma of the latency (0: fixed)
    seed: int = 0
    error_rate: float = 0.0  # share of admitted requests answered 500/502/503
    drop_rate: float = 0.0  # share of admitted requests whose connection is closed without a response
    slow_rate: float = 0.0  # share of requests that get slow_ms extra latency
    slow_ms: float = 5_000.0
    quota_after: int | None = None  # after this many admitted requests: 429 insufficient_quota
    api_key: str | None = None  # if set, any other bearer key gets 401
    completion_tokens: int = 16  # completion tokens generated when the request has no output cap
    chars_per_token: float = 4.0  # how the server estimates prompt tokens for rate limiting
    batch: BatchMockConfig = field(default_factory=BatchMockConfig)  # the Batch API's pace, limits and faults

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.quantum_s <= 0:
            raise ValueError(f"quantum_s must be > 0, got {self.quantum_s}")
        for name in ("error_rate", "drop_rate", "slow_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.latency_ms < 0 or self.latency_sigma < 0 or self.slow_ms < 0:
            raise ValueError("latency_ms, latency_sigma and slow_ms must be >= 0")
        if self.completion_tokens < 1 or self.chars_per_token <= 0:
            raise ValueError("completion_tokens must be >= 1 and chars_per_token > 0")


def _limit(text: str) -> int | None:
    """Parse a limit where "none" or 0 mean no limit."""
    if text.strip().lower() in ("none", "off", "0"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"limit must be >= 0, got {value}")
    return value


def add_mock_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the MockConfig options (not --host/--port) to `parser`."""
    d = MockConfig()
    g = parser.add_argument_group("mock server")
    g.add_argument(
        "--rpm",
        type=_limit,
        default=d.rpm,
        help=f"requests per minute; 0 or 'none': unlimited (default {d.rpm})",
    )
    g.add_argument(
        "--tpm",
        type=_limit,
        default=d.tpm,
        help=f"tokens per minute; 0 or 'none': unlimited (default {d.tpm})",
    )
    g.add_argument(
        "--quantum",
        type=float,
        default=d.quantum_s,
        metavar="SECONDS",
        help="rate-limit quantization: bursts may use only this many seconds' worth "
        f"of the per-minute limits (default {d.quantum_s})",
    )
    g.add_argument(
        "--latency-ms", type=float, default=d.latency_ms, help="median response latency in ms (default 0)"
    )
    g.add_argument(
        "--latency-sigma",
        type=float,
        default=d.latency_sigma,
        help="lognormal sigma of the latency; 0: fixed (default 0)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="random seed for latency and faults")
    g.add_argument(
        "--error-rate",
        type=float,
        default=d.error_rate,
        help="share of admitted requests answered 500/502/503 (default 0)",
    )
    g.add_argument(
        "--drop-rate",
        type=float,
        default=d.drop_rate,
        help="share of admitted requests whose connection is closed unanswered (default 0)",
    )
    g.add_argument(
        "--slow-rate",
        type=float,
        default=d.slow_rate,
        help="share of requests that get --slow-ms extra latency (default 0)",
    )
    g.add_argument(
        "--slow-ms",
        type=float,
        default=d.slow_ms,
        help=f"extra latency of slow requests in ms (default {d.slow_ms:g})",
    )
    g.add_argument(
        "--quota-after",
        type=int,
        default=d.quota_after,
        metavar="N",
        help="after N admitted requests answer every request 429 insufficient_quota",
    )
    g.add_argument(
        "--api-key",
        default=d.api_key,
        help="accept only this bearer key; others get 401 (default: accept any)",
    )
    g.add_argument(
        "--completion-tokens",
        type=int,
        default=d.completion_tokens,
        help=f"completion tokens per reply when the request sets no cap (default {d.completion_tokens})",
    )
    g.add_argument(
        "--chars-per-token",
        type=float,
        default=d.chars_per_token,
        help=f"characters per token when estimating prompt tokens (default {d.chars_per_token:g})",
    )
    add_batch_arguments(parser)


def config_from_args(args: argparse.Namespace) -> MockConfig:
    """Build a MockConfig from arguments added by add_mock_arguments."""
    d = MockConfig()
    return MockConfig(
        rpm=args.rpm,
        tpm=args.tpm,
        quantum_s=args.quantum,
        latency_ms=args.latency_ms,
        latency_sigma=args.latency_sigma,
        seed=args.seed,
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
        slow_rate=args.slow_rate,
        slow_ms=args.slow_ms,
        quota_after=args.quota_after,
        api_key=args.api_key,
        completion_tokens=getattr(args, "completion_tokens", d.completion_tokens),
        chars_per_token=getattr(args, "chars_per_token", d.chars_per_token),
        batch=batch_config_from_args(args),
    )
