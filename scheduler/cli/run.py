"""``scheduler run``: a resumable bulk run of a JSONL file through a pool, with live progress.

``--tier`` picks where the requests run: ``standard`` (online), ``flex`` (online, ``service_tier: "flex"``),
``batch`` (the Batch API) or ``auto`` (the Batch API, then online before ``--deadline``); the Batch API's flow is
in :mod:`.tiers`. ``--dry-run`` prints what the run would cost (:mod:`.estimate`) and sends nothing.

Exit codes: 0 every request succeeded, 1 some failed, 2 unusable input or arguments (nothing sent), 3 a
run-fatal error stopped the run (quota, a refused key, the budget, the output that cannot be written, the shared
limit's Redis gone), 130 interrupted (Ctrl-C). A stopped run resumes when the same command runs again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import anyio
import structlog

from ..errors import BudgetExhausted, SchedulerError
from ..jsonl import InputScan, OutputScan, scan_input, scan_output
from ..limits import Limits
from ..logs import configure_logging
from ..output import OutputLocked, OutputUnwritable, OutputWriter
from ..pool import Pool
from ..progress import Progress, RunCounts, endpoint_summary
from ..requests import Request
from .endpoints_file import EndpointEntry, build_endpoints, read_endpoints
from .estimate import dry_run
from .options import (
    DEFAULT_MODEL,
    TIER_CHOICES,
    UsageError,
    api_settings,
    deadline,
    dollars,
    fail,
    model_limit,
    positive_int,
    reserve_share,
    seconds,
)
from .plan import MOCK_RPM, MOCK_TPM, POLL_S, Plan
from .runtime import (
    CurrentStderr,
    FirstSend,
    LogFilter,
    Recorder,
    RunState,
    WarmEstimator,
    input_requests,
    process_age,
    warm_up,
)
from .tiers import check_tier_arguments, flex_extra, run_batches, saving, tier_figures
from .verdict import SIGNAL_EXIT, refusal, verdict

if TYPE_CHECKING:
    from openai import AsyncOpenAI


__all__ = ["add_parser"]

log = structlog.get_logger("scheduler")

_MOCK_LATENCY_MS = 50.0  # --mock: a small, realistic latency
_MOCK_KEY = "mock-key"
# Requests submitted beyond those in flight: they wait in the pool's queue, where priorities order them.
_READ_AHEAD = 2048  # a full combined embeddings request (2,048 inputs) can form from what is queued
_REDIS_UNAVAILABLE = "shared_limit_unavailable"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` to the ``scheduler`` command."""
    run = commands.add_parser(
        "run",
        help="run a JSONL file of requests; resumable",
        description="Run every request of INPUT (Batch API lines, request bodies or {\"prompt\": ...} lines) "
        "and append Batch API output lines to OUTPUT. Running the same command again resumes. The API key "
        "comes from OPENAI_API_KEY (a server of your own, given by --base-url, may need none).",
    )
    add = run.add_argument
    add("input", type=Path, help="requests, one JSON object a line")
    add("-o", "--output", type=Path, required=True, help="results file (appended to; resumed from)")
    add("--model", default=DEFAULT_MODEL, help=f"model of requests that name none (default {DEFAULT_MODEL})")
    add("--rpm", type=positive_int, help="requests per minute to stay under (default: the API's headers)")
    add("--tpm", type=positive_int, help="tokens per minute to stay under (default: the API's headers)")
    add("--limit", type=model_limit, action="append", default=[], metavar="MODEL=RPM,TPM",
        help="a model's own limits (repeatable); --rpm/--tpm are the limits of every model not named. Each model "
        "has buckets of its own, as OpenAI limits each model separately")
    add("--tier", choices=TIER_CHOICES, default="standard",
        help="standard (default); flex: online at about batch prices, slower, may wait for capacity; batch: the "
        "Batch API, half price, results within 24 h; auto: the Batch API, then what is left online in time for "
        "--deadline")
    add("--deadline", type=deadline, metavar="WHEN",
        help="for --tier auto: when everything must be done, a duration from now (6h, 90m, 45s) or an ISO time "
        "(2025-06-01T18:00, local time)")
    add("--flex-fallback", choices=["standard"],
        help="--tier flex: send a request that flex has no capacity for at the standard tier instead of waiting "
        "(--tier auto always does)")
    add("--dry-run", action="store_true",
        help="print the requests, tokens, cost and time of the plan (as scheduler estimate) and send nothing")
    add("--batch-size", type=positive_int, default=50_000, metavar="N",
        help="batch tiers: requests per batch input file (default and most: 50,000)")
    add("--poll-interval", type=seconds, default=POLL_S, metavar="SECONDS",
        help=f"batch tiers: the longest wait between two polls of running batches (default {POLL_S:g})")
    add("--endpoints", type=Path, metavar="FILE",
        help="several keys, deployments or servers as one pool: a TOML file of [[endpoint]] tables (base_url, "
        "api_key_env, rpm, tpm, models, weight, dialect, name); each request goes to the endpoint that can take "
        "it soonest. Instead of --base-url; --rpm/--tpm serve endpoints that give no limits")
    add("--reserve", type=reserve_share, action="append", default=[], metavar="PRIORITY=SHARE",
        help="keep SHARE of every limit for requests of PRIORITY or more urgent (lower), e.g. 0=0.2; with --redis "
        "it holds for every process sharing the limits (repeatable)")
    add("--priority", type=int, default=0, metavar="N",
        help="the priority of input lines that give none (default 0; lower runs first)")
    add("--workers", type=positive_int, default=64, help="most requests in flight (default 64)")
    add("--max-attempts", type=positive_int, default=6, help="attempts per request (default 6)")
    add("--base-url", help="API base URL (default: OPENAI_BASE_URL, else OpenAI's)")
    add("--mock", action="store_true",
        help="run against the built-in mock server (no key needed); --rpm/--tpm set its limits")
    add("--redis", metavar="URL",
        help="share --rpm/--tpm with every process and host that uses this Redis (one budget)")
    add("--redis-grace", type=seconds, default=30.0, metavar="SECONDS",
        help="how long admission waits through a Redis outage before the run stops (default 30)")
    add("--budget", type=dollars, metavar="USD",
        help="the job's spending limit in US dollars, counting what OUTPUT already records as spent")
    add("--prices", type=Path, metavar="FILE", help="JSON prices per model, adding to the built-in list prices")
    add("--cache", metavar="PATH",
        help="response cache for deterministic requests (temperature 0, embeddings): a SQLite file, or "
        "'redis' to keep it in the --redis server")
    add("--fallback", action="append", default=[], metavar="MODEL",
        help="a model to try when a request's model fails for good (404, retries exhausted); repeatable")
    add("--rerun-changed", action="store_true",
        help="run again the lines whose request changed since their result was written (the new line "
        "supersedes the old: the last line of a custom_id is its result)")
    add("--no-coalesce", action="store_true",
        help="send each one-text embeddings line as a request of its own (default: lines queued together go out "
        "as one request of up to 2,048 inputs, each still getting its own output line)")
    add("--trim", action="store_true",
        help="drop a chat's oldest messages (never system messages nor the last user message) until it fits its "
        "model's context window; without it, a request that cannot fit gets an error record and is not sent")
    add("--echo-request", action="store_true",
        help="copy each request's body into its output line (scheduler.request_body)")
    add("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT")
    add("-v", "--verbose", action="store_true", help="also log retries and other info events")
    add("-q", "--quiet", action="store_true",
        help="no progress and no summary; one line on stderr only when the run did not fully succeed")
    run.set_defaults(handler=_run)


# ---------------------------------------------------------------------------------------------- run


class _StartFailed(Exception):
    """The run could not start (before any request): exit 2, and no output file left behind."""


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic() - process_age()
    live = sys.stderr.isatty() and not args.quiet
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    configure_logging(json=not sys.stderr.isatty(), level=level)
    hush = LogFilter(live=live)
    structlog.configure(processors=[hush, *structlog.get_config()["processors"]])
    if live:
        # Logs must go through whatever sys.stderr is when written: rich's proxy while the display runs.
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(cast(TextIO, CurrentStderr())))
    first_sent, tokenizer_ready = threading.Event(), threading.Event()
    threading.Thread(target=warm_up, args=(args.model, first_sent, tokenizer_ready), daemon=True).start()
    try:
        plan = _plan(args)
    except UsageError as exc:
        return fail("run", str(exc))
    with contextlib.suppress(AttributeError, ValueError):  # no SIGXFSZ on Windows
        # Past a file-size limit (ulimit -f) a write then fails with EFBIG instead of killing the process, and
        # the run stops with whole lines, saying why.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        # First of all, and held to the end: a second run on this output must not even repair it.
        writer = OutputWriter(plan.output, echo_requests=plan.echo_requests)
    except OutputLocked as exc:
        return fail("run", str(exc))
    except OSError as exc:
        return fail("run", f"cannot write the output: {exc}")
    try:
        state = RunState(RunCounts(), started, first_sent, tokenizer_ready)
        hush.state = state
        try:
            return _run_locked(plan, writer, state, live)
        except _StartFailed as exc:
            writer.discard_if_unused()
            return fail("run", str(exc))
        except KeyboardInterrupt:
            writer.discard_if_unused()  # Ctrl-C while the files are read: nothing was sent
            raise
    finally:
        writer.close()


def _run_locked(plan: Plan, writer: OutputWriter, state: RunState, live: bool) -> int:
    try:
        prior = scan_output(plan.output)
        scan = scan_input(plan.input, prior, model=plan.model)
    except OSError as exc:
        raise _StartFailed(str(exc)) from exc
    problem = refusal(plan, scan)
    if problem is not None:
        raise _StartFailed(problem)
    counts = state.counts
    counts.lines, counts.skipped = scan.lines, scan.done
    if plan.dry_run:
        dry_run(plan, prior, scan)
        writer.discard_if_unused()
        return 0
    where = (f"{plan.model}, mock server" if plan.mock else
             f"{plan.model}, {len(plan.endpoints)} endpoints" if plan.endpoints else plan.model)
    tier = "" if plan.tier == "standard" else f", {plan.tier} tier"
    title = f"scheduler run  {plan.input} -> {plan.output}  ({where}{tier})"
    progress = Progress(counts, title=title, live=live, quiet=plan.quiet)
    budget_left = None if plan.budget_usd is None else plan.budget_usd - prior.spent_usd
    if counts.to_do > 0 and budget_left is not None and budget_left <= 0:
        state.stop(BudgetExhausted.code, "the budget is spent")  # nothing is sent
    elif counts.to_do > 0:
        asyncio.run(_execute(plan, writer, state, progress, prior, scan, budget_left))
    code, message = verdict(plan, state, scan, prior)
    stats = state.statistics
    first = state.first_request
    figures: dict[str, Any] = {
        "input": str(plan.input), "output": str(plan.output), "requests": counts.lines,
        "already_done": counts.skipped, "succeeded": counts.succeeded, "failed": counts.failed,
        "invalid_lines": counts.invalid, "not_done": counts.to_do - counts.done, "truncated": counts.truncated,
        "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
        "retries": stats.retries if stats else 0, "rate_limited": stats.rate_limited if stats else 0,
        "pauses": stats.pauses if stats else 0, "trimmed": stats.trimmed_jobs if stats else 0,
        "token_ratio": round(stats.token_ratio, 3) if stats and stats.token_ratio != 1.0 else None,
        "capacity_refused": stats.capacity_refused if stats else 0,
        "flex_fallbacks": stats.flex_fallbacks if stats else 0,
        # Embeddings lines answered together, and the requests that carried them.
        "coalesced_lines": stats.coalesced_jobs if stats else 0,
        "coalesced_requests": stats.coalesced_requests if stats else 0,
        **tier_figures(plan, state),
        "cost_usd": round(counts.cost_usd, 6),
        **saving(counts),
        "earlier_cost_usd": round(prior.spent_usd, 6),
        "first_request_s": round(first - state.started, 3) if first is not None else None,
        "elapsed_s": round(time.monotonic() - state.started, 3), "exit_code": code,
    }
    if (endpoints := endpoint_summary(stats, counts)) is not None:
        figures["endpoints"] = endpoints
    progress.summary(figures, message)
    return code


def _plan(args: argparse.Namespace) -> Plan:
    reserve = dict(args.reserve)
    try:
        Limits(reserve=reserve)
    except ValueError as exc:
        raise UsageError(f"--reserve: {exc}".replace("Limits.reserve ", "")) from None
    endpoints: tuple[EndpointEntry, ...] = ()
    if args.endpoints is not None:
        if args.mock or args.base_url:
            raise UsageError("--endpoints names every endpoint's base_url: leave out --mock and --base-url")
        endpoints = tuple(read_endpoints(args.endpoints, reserve=reserve))
        if args.redis and not (args.rpm or args.tpm) and any(e.limits is None for e in endpoints):
            raise UsageError("--redis shares the limits: give every endpoint of --endpoints its rpm and/or tpm "
                             "(or --rpm/--tpm for those that give none)")
        key, base_url = "", None
    elif args.mock:
        if args.base_url:
            raise UsageError("--mock runs its own server: leave out --base-url")
        key, base_url = _MOCK_KEY, None
    else:
        key, base_url = api_settings(args.base_url)
    source: Path = args.input
    output: Path = args.output
    if not source.is_file():
        raise UsageError(f"no such input file (or not a regular file): {source}")
    if output.is_dir():
        raise UsageError(f"the output is a directory: {output}")
    if not output.parent.is_dir():
        raise UsageError(f"the output's directory does not exist: {output.parent}")
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError("the output file is the input file")
    if args.redis and not (args.rpm or args.tpm) and not endpoints:
        raise UsageError("--redis shares the limits: give --rpm and/or --tpm (for all processes together)")
    if args.redis and args.mock:
        raise UsageError("--redis with --mock: each run would have its own mock server; use --base-url")
    if args.cache == "redis" and not args.redis:
        raise UsageError("--cache redis keeps the cache in the --redis server: give --redis URL")
    if args.prices is not None and not args.prices.is_file():
        raise UsageError(f"no such prices file: {args.prices}")
    check_tier_arguments(args)
    return Plan(source, output, args.model, key, base_url, args.mock, args.rpm, args.tpm, args.workers,
                 args.max_attempts, args.redis, args.redis_grace, args.budget, args.prices, args.cache,
                 tuple(args.fallback), args.metrics_port, args.rerun_changed, args.echo_request, args.quiet,
                 tuple((model, replace(limits, reserve=reserve)) for model, limits in args.limit), args.tier,
                 args.deadline, args.flex_fallback, args.dry_run, args.batch_size, args.poll_interval,
                 coalesce=not args.no_coalesce, trim=args.trim, endpoints=endpoints, reserve=tuple(reserve.items()),
                 priority=args.priority)


async def _execute(
    plan: Plan, writer: OutputWriter, state: RunState, progress: Progress, prior: OutputScan, scan: InputScan,
    budget_left: float | None,
) -> None:
    """Run the requests not done yet on the plan's tier, writing each result as it completes.

    Raises:
        _StartFailed: the run could not start (a bad prices file, an unreachable Redis); nothing was sent.
    """
    async with contextlib.AsyncExitStack() as stack:
        # With --endpoints each endpoint has a client of its own, made with the pool.
        client = None if plan.endpoints else await _client(plan, stack)
        if plan.tier in ("batch", "auto"):
            assert client is not None  # --endpoints serves the online tiers only
            requests = await run_batches(plan, client, writer, state, progress, prior, scan)
            if requests is None:
                return  # every request ran on the Batch API, or the run stopped
        else:
            requests = input_requests(plan.input, plan.model, writer, state, prior, scan, writer.expect,
                                      plan.priority)
        await _run_online(plan, client, writer, state, progress, requests, budget_left, stack)


async def _run_online(
    plan: Plan, client: AsyncOpenAI | None, writer: OutputWriter, state: RunState, progress: Progress,
    requests: Iterator[Request], budget_left: float | None, stack: contextlib.AsyncExitStack,
) -> None:
    """Run ``requests`` through a pool (flex for --tier flex; flex where offered, else standard, for what --tier
    auto left online)."""
    from ..admission.redis_store import SharedLimitUnavailable

    try:
        pool = await _pool(plan, client, state, writer, budget_left, stack)
    except SchedulerError as exc:
        raise _StartFailed(str(exc)) from exc
    progress.tier = "flex" if plan.tier == "flex" else "online" if plan.tier == "auto" else "standard"
    extra = flex_extra(plan, pool.prices)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows: Ctrl-C stops at once
        for signum in SIGNAL_EXIT:
            loop.add_signal_handler(signum, _on_signal, signum, state, pool, progress)
    state.hard_stop = anyio.CancelScope()
    try:
        with state.hard_stop:
            async with pool, anyio.create_task_group() as tasks:
                if plan.metrics_port is not None:
                    from ..metrics import serve_metrics

                    metrics = await serve_metrics(pool, plan.metrics_port)
                    stack.push_async_callback(metrics.aclose)
                progress.follow(pool.statistics)
                tasks.start_soon(progress.watch)
                tasks.start_soon(_watch, state, pool, writer)
                async with anyio.create_task_group() as feeders:
                    for _ in range(plan.workers + _READ_AHEAD):
                        feeders.start_soon(_feed, pool, requests, extra)
                tasks.cancel_scope.cancel()
    except Exception as exc:
        # Redis gone for longer than the grace: admission cannot go on without the shared budget.
        unavailable = _find(exc, SharedLimitUnavailable)
        if unavailable is None:
            raise
        state.stop(_REDIS_UNAVAILABLE, str(unavailable))
    finally:
        state.statistics = pool.statistics()
        state.first_sent.set()
        for signum in SIGNAL_EXIT:
            loop.remove_signal_handler(signum)


async def _client(plan: Plan, stack: contextlib.AsyncExitStack) -> AsyncOpenAI:
    """The mock server (with --mock) and the SDK client, closed with ``stack``."""
    from openai import AsyncOpenAI, DefaultAioHttpClient  # here: the SDK's import is most of the start-up

    base_url = plan.base_url
    if plan.mock:
        from ..mock import MockConfig, MockServer

        # Its Batch API runs in accelerated time (seconds instead of hours): see BatchMockConfig.
        config = MockConfig(rpm=plan.rpm or MOCK_RPM, tpm=plan.tpm or MOCK_TPM, latency_ms=_MOCK_LATENCY_MS)
        base_url = (await stack.enter_async_context(MockServer(config))).base_url
    client = AsyncOpenAI(api_key=plan.key, base_url=base_url, http_client=DefaultAioHttpClient())
    stack.push_async_callback(client.close)
    return client


async def _pool(
    plan: Plan, client: AsyncOpenAI | None, state: RunState, writer: OutputWriter, budget_left: float | None,
    stack: contextlib.AsyncExitStack,
) -> Pool:
    """The shared limiter (with --redis) and the pool, not yet entered.

    Raises:
        SchedulerError: one of them cannot be made (nothing was sent).
    """
    from openai import AsyncOpenAI, DefaultAioHttpClient

    from ..admission import Limiter
    from ..transport import OpenAITransport

    def make_client(**settings: Any) -> AsyncOpenAI:
        made = AsyncOpenAI(**settings, http_client=DefaultAioHttpClient())
        stack.push_async_callback(made.close)
        return made

    # With --endpoints, each endpoint has a client of its own (its key from its own variable).
    endpoints = build_endpoints(plan.endpoints, make_client, lambda inner: FirstSend(inner, state))
    reserve = dict(plan.reserve)
    limits = Limits(rpm=plan.rpm, tpm=plan.tpm, reserve=reserve) if plan.rpm or plan.tpm else None
    store = None
    if plan.redis is not None:
        # Connected here rather than by the pool, to set how long a Redis outage is waited through.
        from ..admission.redis_store import RedisStore

        assert limits is not None  # checked in _plan
        store = await RedisStore.connect(plan.redis, outage_grace_s=plan.redis_grace_s)
    # The pool closes the limiter (and so the store's connections) when it closes.
    limiter = Limiter(limits, model_limits=dict(plan.model_limits), store=store, reserve=reserve)
    cache: Any = plan.cache
    if cache == "redis":
        from ..cache import RedisCache

        assert plan.redis is not None  # checked in _plan
        cache = RedisCache(plan.redis)
        stack.push_async_callback(cache.aclose)
    from ..cost import PriceTable

    prices = PriceTable.load(plan.prices)
    # No model for the pool: every body names one, and a pool with a model waits for its tokenizer.
    pool = Pool(
        client=client,  # requests go through the transport
        endpoints=endpoints,
        limiter=limiter,
        workers=plan.workers, max_attempts=plan.max_attempts, queue_size=_READ_AHEAD,
        sink=Recorder(writer, state, prices),
        transport=FirstSend(OpenAITransport(client), state) if client is not None else None,
        budget_usd=budget_left, prices=prices, cache=cache, fallbacks=plan.fallbacks,
        estimator=WarmEstimator(state.tokenizer_ready),
        flex_fallback="standard" if plan.tier == "auto" else plan.flex_fallback,  # type: ignore[arg-type]
        coalesce=plan.coalesce, trim=plan.trim,
    )
    return pool


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of that kind inside it (task groups wrap what their tasks raise)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    return None


async def _feed(
    pool: Pool, requests: Iterator[Request], extra: Callable[[str, Any], Mapping[str, Any]] | None
) -> None:
    """Submit requests one after another; the feeders share one iterator, so each line is taken once.
    ``extra`` says what fields (a service tier) to add to a body of a model; a body's own ``service_tier`` wins.

    Not ``pool.map()``: its results would pile up unread when they come faster than one a loop turn, and the
    sink already has every result.
    """
    for request in requests:
        body = request.body
        add = extra(request.endpoint, body.get("model")) if extra is not None else None
        if add and "service_tier" not in body:
            body = {**body, **add}
        await pool.submit(body, endpoint=request.endpoint, custom_id=request.custom_id,
                          priority=request.priority, raise_errors=False)


def _on_signal(signum: int, state: RunState, pool: Pool, progress: Progress) -> None:
    if state.signal is not None:
        # The second Ctrl-C: stop at once. Requests in flight are not written, so the next run does them.
        progress.say("Stopping now: the requests in flight are abandoned; the next run does them.", "run_stopping_now")
        if state.hard_stop is not None:
            state.hard_stop.cancel()
        return
    state.signal = signum
    state.stopping = signal.Signals(signum).name
    pool.stop("the run was interrupted")
    in_flight = pool.statistics().in_flight
    progress.say(f"Stopping: waiting for the {in_flight} request(s) in flight (Ctrl-C again to stop at once). "
                 "Run the same command again to resume.", "run_stopping")


async def _watch(state: RunState, pool: Pool, writer: OutputWriter) -> None:
    """Stop at once when the output is deleted or replaced; once the run is stopping, end it as soon as nothing
    is in flight and every result is written.

    A job waiting out a retry backoff holds no request open: the next run does it, rather than this one wait.
    """
    while True:
        await anyio.sleep(0.05)
        try:
            writer.check()
        except OutputUnwritable as exc:
            state.stop_at_once(exc)
            return
        if state.stopping is None:
            continue
        stats = pool.statistics()
        if stats.in_flight == 0 and stats.succeeded + stats.failed == state.received:
            assert state.hard_stop is not None
            state.hard_stop.cancel()
            return
