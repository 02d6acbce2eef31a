"""Configuration of the mock server and its command-line arguments (every field has a flag)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .batch_config import BatchMockConfig, add_batch_arguments, batch_config_from_args
from .faults import FAULTS, check_rates

DIALECTS = ("openai", "azure", "anthropic", "litellm", "none")

#: Context windows (tokens) of the mock's models; models not listed are not checked.
CONTEXT_WINDOWS: Mapping[str, int] = {
    "gpt-4o-mini": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1-mini": 1_047_576,
    "mock-model": 128_000,
}

#: A model's own limits: (rpm, tpm) or (rpm, tpm, otpm); None in a place means unlimited.
ModelLimit = tuple[int | None, ...]


def _model_limits(value: Mapping[str, ModelLimit], where: str) -> dict[str, tuple[int | None, int | None, int | None]]:
    out: dict[str, tuple[int | None, int | None, int | None]] = {}
    for model, limits in value.items():
        if len(limits) not in (2, 3):
            raise ValueError(f"{where}[{model!r}] must be (rpm, tpm) or (rpm, tpm, otpm), got {limits!r}")
        for v in limits:
            if v is not None and v < 1:
                raise ValueError(f"{where}[{model!r}]: limits must be >= 1 or None, got {limits!r}")
        rpm, tpm, *rest = limits
        out[model] = (rpm, tpm, rest[0] if rest else None)
    return out


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The limits of one API key (an OpenAI organisation or project, an endpoint): its own buckets.

    `model_limits` gives some models their own buckets under this key (None: the server's `model_limits`);
    `otpm` is the output-token limit of the anthropic dialect.
    """

    rpm: int | None
    tpm: int | None
    otpm: int | None = None
    model_limits: Mapping[str, ModelLimit] | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "otpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"KeyLimits.{name} must be >= 1 or None, got {value}")
        if self.model_limits is not None:
            object.__setattr__(self, "model_limits", _model_limits(self.model_limits, "KeyLimits.model_limits"))


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock server limits, delays and fails requests, and which provider it imitates."""

    rpm: int | None = 10_000  # None: no request limit
    tpm: int | None = 2_000_000  # None: no token limit (anthropic: input tokens per minute)
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
    # -- faults ------------------------------------------------------------------------------------
    fault_rates: Mapping[str, float] = field(default_factory=dict)  # fault name -> share of admitted requests
    retry_after_long_s: float = 60.0  # retry-after of the retry_after_long fault
    rate_limit_headers: bool = True  # False: never send rate-limit headers (limits still enforced)
    fill_output_cap: bool = False  # every answer uses its whole output cap (finish_reason "length")
    uncapped_tokens: int | None = None  # completion tokens of requests without a cap (None: completion_tokens)
    long_output_tokens: int = 4_000  # completion tokens of a max_output fault on a request without a cap
    # -- limits per key and per model --------------------------------------------------------------
    keys: Mapping[str, KeyLimits] | None = None  # set: only these keys, each with its own buckets
    model_limits: Mapping[str, ModelLimit] = field(default_factory=dict)  # model -> (rpm, tpm[, otpm])
    otpm: int | None = None  # anthropic dialect: output tokens per minute (None: unlimited)
    # -- dialects ----------------------------------------------------------------------------------
    dialect: str = "openai"  # openai | azure | anthropic | litellm | none
    azure_window_s: float = 10.0  # azure: requests are counted per window of this many seconds
    anthropic_output_reserve: bool = True  # anthropic: reserve max_tokens of OTPM at start, settle at the end
    litellm_window_s: float = 60.0  # litellm: fixed counting window (a calendar minute)
    litellm_cooldown_s: float = 0.0  # litellm: after a refusal, "No deployments available" for this long
    capacity: int | None = None  # requests processed at once; more wait (None: unlimited)
    max_queue: int | None = None  # requests waiting beyond capacity; more get overload_status (None: unbounded)
    overload_status: int = 503  # status when the queue is full (Ollama: 503)
    # -- flex processing ---------------------------------------------------------------------------
    flex_capacity: float = 1.0  # probability that a flex request finds capacity
    flex_latency_ms: float = 0.0  # extra latency of flex answers
    # -- context windows and embeddings ------------------------------------------------------------
    context_windows: Mapping[str, int] = field(default_factory=lambda: dict(CONTEXT_WINDOWS))
    embedding_max_inputs: int = 2_048  # inputs per embeddings request
    embedding_input_limit: int = 8_192  # tokens per embeddings input (text-embedding-3-*)
    embedding_request_limit: int = 300_000  # tokens per embeddings request, all inputs together
    batch: BatchMockConfig = field(default_factory=BatchMockConfig)  # the Batch API's pace, limits and faults

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "otpm", "uncapped_tokens", "capacity"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        for name in ("quota_after", "max_queue"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        for name in ("quantum_s", "azure_window_s", "litellm_window_s", "chars_per_token"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("error_rate", "drop_rate", "slow_rate", "flex_capacity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        for name in ("latency_ms", "latency_sigma", "slow_ms", "retry_after_long_s", "litellm_cooldown_s",
                     "flex_latency_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("completion_tokens", "long_output_tokens", "embedding_max_inputs", "embedding_input_limit",
                     "embedding_request_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
        if self.overload_status not in (429, 503):
            raise ValueError(f"overload_status must be 429 or 503, got {self.overload_status}")
        check_rates(self.fault_rates)
        object.__setattr__(self, "model_limits", _model_limits(self.model_limits, "model_limits"))
        for model, window in self.context_windows.items():
            if window < 1:
                raise ValueError(f"context_windows[{model!r}] must be >= 1, got {window}")
        if self.keys is not None:
            if not self.keys:
                raise ValueError("keys must name at least one key (or be None)")
            if self.api_key is not None:
                raise ValueError("set either api_key or keys, not both")
            for key, limits in self.keys.items():
                if not isinstance(limits, KeyLimits):
                    raise ValueError(f"keys[...]: expected KeyLimits, got {type(limits).__name__}")
                if not key:
                    raise ValueError("keys: an API key cannot be empty")


# -- command line ----------------------------------------------------------------------------------


def _limit(text: str) -> int | None:
    """Parse a limit where "none" or 0 mean no limit."""
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"limit must be >= 0, got {value}")
    return value


def _limits(text: str) -> tuple[int | None, ...]:
    """Parse "RPM,TPM[,OTPM]"."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected RPM,TPM or RPM,TPM,OTPM, got {text!r}")
    return tuple(_limit(p) for p in parts)


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _fault_rate(text: str) -> tuple[str, float]:
    name, value = _pair(text)
    if name not in FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fault {name}: rate {value!r} is not a number") from None


def _model_limit(text: str) -> tuple[str, tuple[int | None, ...]]:
    model, value = _pair(text)
    return model, _limits(value)


def _key(text: str) -> tuple[str, tuple[int | None, ...] | None]:
    key, sep, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError("--key: the key cannot be empty")
    return key, _limits(value) if sep else None


def _key_model_limit(text: str) -> tuple[str, str, tuple[int | None, ...]]:
    scope, value = _pair(text)
    key, sep, model = scope.partition(":")
    if not sep or not key or not model:
        raise argparse.ArgumentTypeError(f"expected KEY:MODEL=RPM,TPM[,OTPM], got {text!r}")
    return key, model, _limits(value)


def _context_window(text: str) -> tuple[str, int | None]:
    model, value = _pair(text)
    return model, _limit(value)


def add_mock_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the MockConfig options (not --host/--port) to `parser`."""
    d = MockConfig()
    g = parser.add_argument_group("mock server: limits and latency")
    g.add_argument("--rpm", type=_limit, default=d.rpm,
                   help=f"requests per minute; 0 or 'none': unlimited (default {d.rpm})")
    g.add_argument("--tpm", type=_limit, default=d.tpm,
                   help=f"tokens per minute (anthropic: input tokens); 0 or 'none': unlimited (default {d.tpm})")
    g.add_argument("--otpm", type=_limit, default=d.otpm,
                   help="anthropic dialect: output tokens per minute (default: unlimited)")
    g.add_argument("--quantum", type=float, default=d.quantum_s, metavar="SECONDS",
                   help="rate-limit quantization: bursts may use only this many seconds' worth "
                   f"of the per-minute limits (default {d.quantum_s})")
    g.add_argument("--latency-ms", type=float, default=d.latency_ms, help="median response latency in ms (default 0)")
    g.add_argument("--latency-sigma", type=float, default=d.latency_sigma,
                   help="lognormal sigma of the latency; 0: fixed (default 0)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed for latency and faults")
    g.add_argument("--api-key", default=d.api_key, help="accept only this bearer key; others get 401 (default: any)")
    g.add_argument("--key", action="append", type=_key, default=[], metavar="KEY[=RPM,TPM[,OTPM]]",
                   help="accept this key with its own buckets (default: --rpm/--tpm); others get 401; repeatable")
    g.add_argument("--model-limit", action="append", type=_model_limit, default=[], metavar="MODEL=RPM,TPM[,OTPM]",
                   help="give MODEL its own buckets (other models share the default ones); repeatable")
    g.add_argument("--key-model-limit", action="append", type=_key_model_limit, default=[],
                   metavar="KEY:MODEL=RPM,TPM[,OTPM]", help="a model's own buckets under one --key; repeatable")
    g.add_argument("--completion-tokens", type=int, default=d.completion_tokens,
                   help=f"completion tokens per reply when the request sets no cap (default {d.completion_tokens})")
    g.add_argument("--uncapped-tokens", type=int, default=d.uncapped_tokens, metavar="N",
                   help="completion tokens of requests without an output cap (default: --completion-tokens)")
    g.add_argument("--fill-output-cap", action="store_true",
                   help="every answer uses its whole output cap (finish_reason length)")
    g.add_argument("--long-output-tokens", type=int, default=d.long_output_tokens, metavar="N",
                   help=f"tokens of a max_output fault on a request without a cap (default {d.long_output_tokens})")
    g.add_argument("--chars-per-token", type=float, default=d.chars_per_token,
                   help=f"characters per token when estimating prompt tokens (default {d.chars_per_token:g})")
    g.add_argument("--capacity", type=int, default=d.capacity, metavar="N",
                   help="requests processed at once; more wait in a queue (default: unlimited)")
    g.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help="requests waiting beyond --capacity; more get --overload-status (default: unbounded)")
    g.add_argument("--overload-status", type=int, choices=(429, 503), default=d.overload_status,
                   help=f"status when the queue is full (default {d.overload_status}, as Ollama)")

    f = parser.add_argument_group("mock server: faults")
    f.add_argument("--error-rate", type=float, default=d.error_rate,
                   help="share of admitted requests answered 500/502/503 (default 0)")
    f.add_argument("--drop-rate", type=float, default=d.drop_rate,
                   help="share of admitted requests whose connection is closed unanswered (default 0)")
    f.add_argument("--slow-rate", type=float, default=d.slow_rate,
                   help="share of requests that get --slow-ms extra latency (default 0)")
    f.add_argument("--slow-ms", type=float, default=d.slow_ms,
                   help=f"extra latency of slow requests in ms (default {d.slow_ms:g})")
    f.add_argument("--quota-after", type=int, default=d.quota_after, metavar="N",
                   help="after N admitted requests answer every request 429 insufficient_quota")
    f.add_argument("--fault", action="append", type=_fault_rate, default=[], metavar="NAME=RATE",
                   help="share of admitted requests that get fault NAME; repeatable; names: "
                   + ", ".join(sorted(FAULTS)))
    f.add_argument("--retry-after-long", type=float, default=d.retry_after_long_s, metavar="SECONDS",
                   help=f"retry-after of the retry_after_long fault (default {d.retry_after_long_s:g})")
    f.add_argument("--no-rate-limit-headers", action="store_true",
                   help="never send rate-limit headers (the limits are still enforced)")

    p = parser.add_argument_group("mock server: provider dialect")
    p.add_argument("--dialect", choices=DIALECTS, default=d.dialect,
                   help="whose rate-limit headers, 429s and windows to imitate (default openai)")
    p.add_argument("--azure-window", type=float, default=d.azure_window_s, metavar="SECONDS",
                   help=f"azure: requests are counted per window of this length (default {d.azure_window_s:g})")
    p.add_argument("--anthropic-output-at-end", action="store_true",
                   help="anthropic: charge output tokens when the answer ends, not max_tokens up front")
    p.add_argument("--litellm-window", type=float, default=d.litellm_window_s, metavar="SECONDS",
                   help=f"litellm: fixed counting window (default {d.litellm_window_s:g}: the calendar minute)")
    p.add_argument("--litellm-cooldown", type=float, default=d.litellm_cooldown_s, metavar="SECONDS",
                   help="litellm: after a refusal answer 'No deployments available' this long (default 0)")
    p.add_argument("--flex-capacity", type=float, default=d.flex_capacity, metavar="P",
                   help="probability that a service_tier=flex request finds capacity (default 1)")
    p.add_argument("--flex-latency-ms", type=float, default=d.flex_latency_ms,
                   help="extra latency of flex answers in ms (default 0)")

    m = parser.add_argument_group("mock server: models and embeddings")
    m.add_argument("--context-window", action="append", type=_context_window, default=[], metavar="MODEL=TOKENS",
                   help="a model's context window (0 or 'none': unchecked); repeatable; defaults: "
                   + ", ".join(f"{k}={v}" for k, v in CONTEXT_WINDOWS.items()))
    m.add_argument("--embedding-max-inputs", type=int, default=d.embedding_max_inputs, metavar="N",
                   help=f"inputs per embeddings request (default {d.embedding_max_inputs})")
    m.add_argument("--embedding-input-limit", type=int, default=d.embedding_input_limit, metavar="TOKENS",
                   help=f"tokens per embeddings input (default {d.embedding_input_limit})")
    m.add_argument("--embedding-request-limit", type=int, default=d.embedding_request_limit, metavar="TOKENS",
                   help=f"tokens per embeddings request (default {d.embedding_request_limit})")
    add_batch_arguments(parser)


def config_from_args(args: argparse.Namespace) -> MockConfig:
    """Build a MockConfig from arguments added by add_mock_arguments.

    Raises:
        ValueError: an inconsistent combination (e.g. --key-model-limit for a key not given with --key).
    """
    d = MockConfig()

    def get(name: str, default: Any) -> Any:
        return getattr(args, name, default)

    keys: dict[str, KeyLimits] | None = None
    key_specs: list[tuple[str, tuple[int | None, ...] | None]] = get("key", [])
    key_models: dict[str, dict[str, tuple[int | None, ...]]] = {}
    for key, model, limits in get("key_model_limit", []):
        key_models.setdefault(key, {})[model] = limits
    if key_specs:
        keys = {}
        for key, limits in key_specs:
            rpm, tpm, *rest = limits if limits is not None else (args.rpm, args.tpm, get("otpm", None))
            keys[key] = KeyLimits(rpm, tpm, rest[0] if rest else None, key_models.pop(key, None))
    if key_models:
        raise ValueError(f"--key-model-limit names keys not given with --key: {', '.join(sorted(key_models))}")
    windows = dict(CONTEXT_WINDOWS)
    for model, window in get("context_window", []):
        if window is None:
            windows.pop(model, None)
        else:
            windows[model] = window
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
        completion_tokens=get("completion_tokens", d.completion_tokens),
        chars_per_token=get("chars_per_token", d.chars_per_token),
        fault_rates=dict(get("fault", [])),
        retry_after_long_s=get("retry_after_long", d.retry_after_long_s),
        rate_limit_headers=not get("no_rate_limit_headers", False),
        fill_output_cap=get("fill_output_cap", False),
        uncapped_tokens=get("uncapped_tokens", d.uncapped_tokens),
        long_output_tokens=get("long_output_tokens", d.long_output_tokens),
        keys=keys,
        model_limits=dict(get("model_limit", [])),
        otpm=get("otpm", d.otpm),
        dialect=get("dialect", d.dialect),
        azure_window_s=get("azure_window", d.azure_window_s),
        anthropic_output_reserve=not get("anthropic_output_at_end", False),
        litellm_window_s=get("litellm_window", d.litellm_window_s),
        litellm_cooldown_s=get("litellm_cooldown", d.litellm_cooldown_s),
        capacity=get("capacity", d.capacity),
        max_queue=get("max_queue", d.max_queue),
        overload_status=get("overload_status", d.overload_status),
        flex_capacity=get("flex_capacity", d.flex_capacity),
        flex_latency_ms=get("flex_latency_ms", d.flex_latency_ms),
        context_windows=windows,
        embedding_max_inputs=get("embedding_max_inputs", d.embedding_max_inputs),
        embedding_input_limit=get("embedding_input_limit", d.embedding_input_limit),
        embedding_request_limit=get("embedding_request_limit", d.embedding_request_limit),
        batch=batch_config_from_args(args),
    )
