"""``scheduler run``: a resumable bulk run of a JSONL file through a pool, with live progress.

Exit codes: 0 every request succeeded, 1 some failed, 2 unusable input or arguments, 3 a run-fatal
error (quota, a refused key) stopped the run, 130 interrupted (Ctrl-C). A stopped run resumes when the same
command runs again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import anyio
import structlog

from ..errors import SchedulerError
from ..jsonl import (
    STOPPED_CODES,
    IdSet,
    OutputWriter,
    line_custom_id,
    parse_line,
    read_lines,
    scan_input,
    scan_output,
)
from ..logs import configure_logging
from ..pool import Pool
from ..progress import Progress, RunCounts
from ..requests import Request
from ..tokens import TokenEstimator, output_reservation
from .options import DEFAULT_MODEL, UsageError, api_settings, dollars, positive_int

if TYPE_CHECKING:
    from ..results import Result
    from ..transport import Response, StreamResponse, Transport

__all__ = ["add_parser"]

log = structlog.get_logger("scheduler")

# --mock without --rpm/--tpm: limits far above what one process sends, and a small, realistic latency.
_MOCK_RPM = 30_000
_MOCK_TPM = 50_000_000
_MOCK_LATENCY_MS = 50.0
_MOCK_KEY = "mock-key"
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Requests submitted beyond those in flight: they wait in the pool's queue, where priorities order them.
_READ_AHEAD = 1024


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` to the ``scheduler`` command."""
    run = commands.add_parser(
        "run",
        help="run a JSONL file of requests; resumable",
        description="Run every request of INPUT (Batch API lines, request bodies or {\"prompt\": ...} lines) "
        "and append Batch API output lines to OUTPUT. Running the same command again resumes. The API key "
        "comes from OPENAI_API_KEY.",
    )
    add = run.add_argument
    add("input", type=Path, help="requests, one JSON object a line")
    add("-o", "--output", type=Path, required=True, help="results file (appended to; resumed from)")
    add("--model", default=DEFAULT_MODEL, help=f"model of requests that name none (default {DEFAULT_MODEL})")
    add("--rpm", type=positive_int, help="requests per minute to stay under (default: the API's headers)")
    add("--tpm", type=positive_int, help="tokens per minute to stay under (default: the API's headers)")
    add("--workers", type=positive_int, default=64, help="most requests in flight (default 64)")
    add("--max-attempts", type=positive_int, default=6, help="attempts per request (default 6)")
    add("--base-url", help="API base URL (default: OPENAI_BASE_URL, else OpenAI's)")
    add("--mock", action="store_true",
        help="run against the built-in mock server (no key needed); --rpm/--tpm set its limits")
    add("--redis", metavar="URL",
        help="share --rpm/--tpm with every process and host that uses this Redis (one budget)")
    add("--budget", type=dollars, metavar="USD",
        help="stop admitting before spending could pass this many US dollars; a later run resumes the rest")
    add("--prices", type=Path, metavar="FILE", help="JSON prices per model, adding to the built-in list prices")
    add("--cache", metavar="PATH",
        help="response cache for deterministic requests (temperature 0, embeddings): a SQLite file, or "
        "'redis' to keep it in the --redis server")
    add("--fallback", action="append", default=[], metavar="MODEL",
        help="a model to try when a request's model fails for good (404, retries exhausted); repeatable")
    add("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT")
    add("-v", "--verbose", action="store_true", help="also log retries and other info events")
    run.set_defaults(handler=_run)


# ---------------------------------------------------------------------------------------------- run


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to run, checked before anything is sent."""

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
    budget_usd: float | None = None
    prices: Path | None = None
    cache: str | None = None
    fallbacks: tuple[str, ...] = ()
    metrics_port: int | None = None


@dataclass(slots=True)
class _State:
    """What the run's parts share."""

    counts: RunCounts
    #: monotonic time the process started
    started: float
    #: ids already in the output
    done: IdSet
    #: set when the first request is out: the warm-up thread then loads the tokenizer
    first_sent: threading.Event
    #: set once the tokenizer's encoding has loaded
    tokenizer_ready: threading.Event
    #: why reading stopped: a signal's name, or the code of a run-fatal error
    stopping: str | None = None
    #: the run-fatal error's message
    fatal: str | None = None
    signal: int | None = None
    #: results taken from the pool, written or not
    received: int = 0
    #: monotonic time the first request went out
    first_request: float | None = None
    #: cancels the whole run (made on the event loop)
    hard_stop: anyio.CancelScope | None = None


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic() - _process_age()
    live = sys.stderr.isatty()
    configure_logging(json=not live, level=logging.INFO if args.verbose else logging.WARNING)
    # Jobs a stop kept from running are not failures here (the next run does them): one line says why it
    # stopped, not one per queued job.
    structlog.configure(processors=[_drop_deferred, *structlog.get_config()["processors"]])
    if live:
        # Logs must go through whatever sys.stderr is when written: rich's proxy while the display runs.
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _CurrentStderr())))
    first_sent, tokenizer_ready = threading.Event(), threading.Event()
    threading.Thread(target=_warm_up, args=(args.model, first_sent, tokenizer_ready), daemon=True).start()
    try:
        plan = _plan(args)
        prior = scan_output(plan.output)
        scan = scan_input(plan.input, prior.done)
    except (UsageError, OSError) as exc:
        print(f"scheduler run: error: {exc}", file=sys.stderr)
        return 2
    if scan.duplicates:
        _report_duplicates(plan.input, scan.duplicates)
        return 2
    counts = RunCounts(lines=scan.lines, skipped=scan.done)
    state = _State(counts, started, prior.done, first_sent, tokenizer_ready)
    where = f"{plan.model}, mock server" if plan.mock else plan.model
    title = f"scheduler run  {plan.input} -> {plan.output}  ({where})"
    progress = Progress(counts, title=title, live=live)
    if counts.to_do > 0:
        try:
            writer = OutputWriter(plan.output)
        except OSError as exc:
            print(f"scheduler run: error: cannot write the output: {exc}", file=sys.stderr)
            return 2
        try:
            asyncio.run(_execute(plan, writer, state, progress))
        except (UsageError, SchedulerError) as exc:
            # Found at start-up, before any request: a bad prices file, an unreachable Redis.
            print(f"scheduler run: error: {exc}", file=sys.stderr)
            return 2
        finally:
            writer.close()
    code, message = _verdict(state, prior.failed, plan.output)
    first = state.first_request
    progress.summary(
        {
            "input": str(plan.input), "output": str(plan.output), "requests": counts.lines,
            "already_done": counts.skipped, "succeeded": counts.succeeded, "failed": counts.failed,
            "invalid_lines": counts.invalid, "not_done": counts.to_do - counts.done,
            "prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
            "cost_usd": round(counts.cost_usd, 6),
            "first_request_s": round(first - started, 3) if first is not None else None,
            "elapsed_s": round(time.monotonic() - started, 3), "exit_code": code,
        },
        message,
    )
    return code


def _drop_deferred(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if event.get("event") == "job_failed" and event.get("code") in STOPPED_CODES:
        raise structlog.DropEvent
    return event


def _plan(args: argparse.Namespace) -> _Plan:
    if args.mock:
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
    if args.redis and not (args.rpm or args.tpm):
        raise UsageError("--redis shares the limits: give --rpm and/or --tpm (for all processes together)")
    if args.redis and args.mock:
        raise UsageError("--redis with --mock: each run would have its own mock server; use --base-url")
    if args.cache == "redis" and not args.redis:
        raise UsageError("--cache redis keeps the cache in the --redis server: give --redis URL")
    if args.prices is not None and not args.prices.is_file():
        raise UsageError(f"no such prices file: {args.prices}")
    return _Plan(source, output, args.model, key, base_url, args.mock, args.rpm, args.tpm, args.workers,
                 args.max_attempts, args.redis, args.budget, args.prices, args.cache, tuple(args.fallback),
                 args.metrics_port)


def _report_duplicates(path: Path, duplicates: list[tuple[str, list[int]]]) -> None:
    lines = [f"scheduler run: error: {len(duplicates)} custom_id(s) appear more than once in {path}; "
             "nothing was sent. Give every line its own custom_id:"]
    for custom_id, numbers in duplicates[:20]:
        more = " ..." if len(numbers) > 10 else ""
        lines.append(f"  {custom_id!r} on lines {', '.join(map(str, numbers[:10]))}{more}")
    if len(duplicates) > 20:
        lines.append(f"  ... and {len(duplicates) - 20} more")
    print("\n".join(lines), file=sys.stderr)


def _verdict(state: _State, failed_before: int, output: Path) -> tuple[int, str]:
    """The exit code and what to do next."""
    counts = state.counts
    left = counts.to_do - counts.done
    again = f"run the same command again to finish the {left:,} request(s) not done yet."
    if state.signal is not None:
        return _SIGNAL_EXIT.get(signal.Signals(state.signal), 130), f"Interrupted: {again}"
    if state.fatal is not None:
        return 3, f"Stopped: {state.fatal}. Then {again}"
    if left > 0:
        return 1, f"Not finished: {again}"
    failed = counts.failed + failed_before
    if failed:
        return 1, f"Done: {failed:,} request(s) failed; their error records are in {output}."
    return 0, f"Done: every request succeeded; results in {output}."


async def _execute(plan: _Plan, writer: OutputWriter, state: _State, progress: Progress) -> None:
    """Run the requests not done yet through a pool, writing each result as it completes."""
    from openai import AsyncOpenAI, DefaultAioHttpClient  # here: the SDK's import is most of the start-up

    from ..limits import Limits
    from ..transport import OpenAITransport

    async with contextlib.AsyncExitStack() as stack:
        base_url = plan.base_url
        if plan.mock:
            from ..mock import MockConfig, MockServer

            config = MockConfig(
                rpm=plan.rpm or _MOCK_RPM, tpm=plan.tpm or _MOCK_TPM, latency_ms=_MOCK_LATENCY_MS
            )
            base_url = (await stack.enter_async_context(MockServer(config))).base_url
        client = AsyncOpenAI(api_key=plan.key, base_url=base_url, http_client=DefaultAioHttpClient())
        stack.push_async_callback(client.close)
        cache: Any = plan.cache
        if cache == "redis":
            from ..cache import RedisCache

            assert plan.redis is not None  # checked in _plan
            cache = RedisCache(plan.redis)
            stack.push_async_callback(cache.aclose)
        # No model for the pool: every body names one, and a pool with a model waits for its tokenizer.
        try:
            pool = Pool(
                client=client,  # names the shared budget under --redis; requests go through the transport
                limits=Limits(rpm=plan.rpm, tpm=plan.tpm) if plan.rpm or plan.tpm else None,
                workers=plan.workers, max_attempts=plan.max_attempts, queue_size=_READ_AHEAD,
                sink=_Recorder(writer, state),
                transport=_FirstSend(OpenAITransport(client), state),
                redis=plan.redis, budget_usd=plan.budget_usd, prices=plan.prices, cache=cache,
                fallbacks=plan.fallbacks,
            )
        except SchedulerError as exc:
            raise UsageError(str(exc)) from exc
        pool.estimator = _WarmEstimator(pool.estimator.default_output_tokens, state.tokenizer_ready)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows: Ctrl-C stops at once
            for signum in _SIGNAL_EXIT:
                loop.add_signal_handler(signum, _on_signal, signum, state, pool)
        state.hard_stop = anyio.CancelScope()
        try:
            with state.hard_stop:
                async with pool, anyio.create_task_group() as tasks:
                    if plan.metrics_port is not None:
                        from ..metrics import serve_metrics

                        metrics = await serve_metrics(pool, plan.metrics_port)
                        stack.push_async_callback(metrics.aclose)
                    tasks.start_soon(progress.watch, pool.statistics)
                    tasks.start_soon(_drain_watch, state, pool)
                    requests = _requests(plan, writer, state)
                    async with anyio.create_task_group() as feeders:
                        for _ in range(plan.workers + _READ_AHEAD):
                            feeders.start_soon(_feed, pool, requests)
                    tasks.cancel_scope.cancel()
        finally:
            state.first_sent.set()
            for signum in _SIGNAL_EXIT:
                loop.remove_signal_handler(signum)


async def _feed(pool: Pool, requests: Iterator[Request]) -> None:
    """Submit requests one after another; the feeders share one iterator, so each line is taken once.

    Not ``pool.map()``: its results would pile up unread when they come faster than one a loop turn, and the
    sink already has every result.
    """
    for request in requests:
        await pool.submit(request.body, endpoint=request.endpoint, custom_id=request.custom_id,
                          priority=request.priority, raise_errors=False)


def _requests(plan: _Plan, writer: OutputWriter, state: _State) -> Iterator[Request]:
    """The input's requests not done yet, read as the pool has room; invalid lines become error records."""
    counts, done = state.counts, state.done
    resuming = len(done) > 0
    with plan.input.open("rb") as file:
        for number, raw in read_lines(file):
            if state.stopping is not None:
                return
            if resuming and line_custom_id(number, raw) in done:
                continue  # done by an earlier run: skipped without the full parse
            line = parse_line(number, raw, model=plan.model)
            if line.request is None:
                log.warning("invalid_line", file=str(plan.input), line=number, custom_id=line.custom_id,
                            problem=line.problem)
                writer.write(line.error_result())
                counts.failed += 1
                counts.invalid += 1
                continue
            if line.metadata is not None:
                writer.metadata[line.custom_id] = line.metadata
            yield line.request


def _on_signal(signum: int, state: _State, pool: Pool) -> None:
    if state.signal is not None:
        # The second Ctrl-C: stop at once. Requests in flight are not written, so the next run does them.
        log.warning("run_stopping_now", detail="requests in flight are abandoned; the next run does them")
        if state.hard_stop is not None:
            state.hard_stop.cancel()
        return
    state.signal = signum
    state.stopping = signal.Signals(signum).name
    pool.stop("the run was interrupted")
    log.warning(
        "run_stopping", signal=state.stopping,
        detail="waiting for the requests in flight (Ctrl-C again to stop at once); "
        "run the same command again to resume",
    )


async def _drain_watch(state: _State, pool: Pool) -> None:
    """Once the run is stopping, end it as soon as nothing is in flight and every result is written.

    A job waiting out a retry backoff holds no request open: the next run does it, rather than this one wait.
    """
    while True:
        await anyio.sleep(0.05)
        if state.stopping is None:
            continue
        stats = pool.statistics()
        if stats.in_flight == 0 and stats.succeeded + stats.failed == state.received:
            assert state.hard_stop is not None
            state.hard_stop.cancel()
            return


def _warm_up(model: str, first_sent: threading.Event, ready: threading.Event) -> None:
    """Import the SDK while the main thread reads the files; load the tokenizer's encoding once the first
    request is out. Each takes a good part of a second of CPU, and under the GIL they would slow each other
    down: the first request needs the SDK, not the encoding (see _WarmEstimator)."""
    import openai  # noqa: F401

    first_sent.wait(timeout=10.0)
    TokenEstimator.preload(model)
    ready.set()


class _WarmEstimator(TokenEstimator):
    """Token estimates that never wait for the tokenizer: 4 characters a token (tiktoken's own fallback) until
    the encoding has loaded, tiktoken after. The limiter calibrates estimates from the headers either way."""

    __slots__ = ("_ready",)

    def __init__(self, default_output_tokens: int, ready: threading.Event) -> None:
        super().__init__(default_output_tokens)
        self._ready = ready

    def estimate(self, endpoint: str, body: Mapping[str, Any]) -> int:
        if self._ready.is_set():
            return super().estimate(endpoint, body)
        prompt = math.ceil(self.prompt_chars(endpoint, body) / 4) + 3 * (len(body.get("messages") or ()) + 1)
        return prompt + output_reservation(endpoint, body, self.default_output_tokens)


class _Recorder:
    """The pool's sink: writes each result, counts it, and notices a run-fatal stop."""

    __slots__ = ("_state", "_writer")

    def __init__(self, writer: OutputWriter, state: _State) -> None:
        self._writer = writer
        self._state = state

    async def write(self, result: Result) -> None:
        state = self._state
        state.received += 1
        written = self._writer.write(result)
        state.counts.add(result, written)
        if not written and state.stopping is None and result.error is not None:
            # A run-fatal error (quota, key): stop reading; what is left stays for the next run.
            state.stopping = result.error.code
            state.fatal = result.error.message

    async def aclose(self) -> None:
        return None  # the run closes the file once the pool is gone


class _FirstSend:
    """The pool's transport, noting when the first request goes out (the start-up figure of the summary)."""

    __slots__ = ("_inner", "_state")

    def __init__(self, inner: Transport, state: _State) -> None:
        self._inner = inner
        self._state = state

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response:
        state = self._state
        if state.first_request is None:
            state.first_request = time.monotonic()
            state.first_sent.set()
            log.info("first_request", after_s=round(state.first_request - state.started, 3))
        return await self._inner.send(endpoint, body, timeout=timeout)

    def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> contextlib.AbstractAsyncContextManager[StreamResponse]:
        return self._inner.stream(endpoint, body, timeout=timeout)


class _CurrentStderr:
    """A file writing to whatever ``sys.stderr`` is now (rich swaps in a proxy during the live display)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere), so start-up figures include the imports."""
    try:
        with open("/proc/self/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
