"""What a bulk run shows while it works: a live display on a terminal, JSON status lines otherwise, a summary.

Everything goes to stderr: stdout and the output file carry no progress.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import orjson

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from .batch_api import BatchRunStatistics
    from .limits import Limits
    from .results import Result
    from .statistics import EndpointStatistics, PoolStatistics

__all__ = ["Progress", "RunCounts", "endpoint_summary"]

@dataclass(slots=True)
class RunCounts:
    """The run's own tally (the pool counts attempts; this counts lines of the input and the output)."""

    #: requests in the input
    lines: int = 0
    #: requests already in the output from an earlier run
    skipped: int = 0
    succeeded: int = 0
    #: error records written (invalid lines included)
    failed: int = 0
    invalid: int = 0
    #: jobs the stop kept from running: not written, left for the next run
    not_run: int = 0
    #: successful answers cut short by their output cap (finish_reason "length")
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    #: cost of the results of each tier that served them ("standard", "flex", "batch")
    cost_by_tier: dict[str, float] = field(default_factory=dict)
    #: what the results with a known cost would have cost at standard prices (for the saving of cheaper tiers)
    standard_usd: float = 0.0
    #: the limits the server announced (x-ratelimit-limit-*), shown where the pool was given none
    server_rpm: int | None = None
    server_tpm: int | None = None
    #: successful answers by the endpoint that gave them (Result.served_by)
    answered_by: dict[str, int] = field(default_factory=dict)

    @property
    def to_do(self) -> int:
        return self.lines - self.skipped

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def add(self, result: Result, written: bool, standard_usd: float | None = None) -> None:
        """Count one result; ``written`` says whether it went to the output, ``standard_usd`` what it would have
        cost at standard prices (default: its cost)."""
        if not written:
            self.not_run += 1
        elif result.error is None:
            self.succeeded += 1
            self.truncated += result.truncated
            if result.served_by is not None:
                self.answered_by[result.served_by] = self.answered_by.get(result.served_by, 0) + 1
        else:
            self.failed += 1
        if result.usage is not None:
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens
        # The pool prices results from its list prices (scheduler.cost); None for models it has no price for.
        if result.cost_usd is not None:
            self.cost_usd += result.cost_usd
            tier = result.tier or "standard"
            self.cost_by_tier[tier] = self.cost_by_tier.get(tier, 0.0) + result.cost_usd
            self.standard_usd += result.cost_usd if standard_usd is None else standard_usd


@dataclass(slots=True)
class _Rate:
    """Completions per second over the last ``window_s`` (since the start, early on), for the ETA."""

    started: float
    window_s: float = 15.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        # The run's start is the first sample: the first status line already has an ETA.
        self.samples.append((self.started, 0))

    def update(self, now: float, done: int) -> float | None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 - t0 >= 1.0 else None


class Progress:
    """Shows a run's progress on stderr.

    Args:
        counts: the run's tally, updated by the caller.
        title: one line naming the run (input, output, model).
        live: a rich live display (on a terminal) instead of JSON status lines.
        quiet: neither: no progress, no summary, only the final message when the run did not fully succeed.
        interval_s: seconds between JSON status lines.
        clock: monotonic seconds, for the elapsed time and the ETA.
    """

    def __init__(
        self, counts: RunCounts, *, title: str, live: bool, quiet: bool = False, interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts = counts
        self.title = title
        self.quiet = quiet
        self.interval_s = interval_s
        self._clock = clock
        self.started = clock()
        self._rate = _Rate(self.started)
        self._stats: Callable[[], PoolStatistics] | None = None
        self._batches: Callable[[], BatchRunStatistics] | None = None
        #: the tier the run works on now (shown beside the cost)
        self.tier = "standard"
        self._console: Console | None = None
        self._live: Live | None = None
        if live and not quiet:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(stderr=True)
            # No auto-refresh thread: statistics() must be read on the event loop's thread.
            self._live = Live(console=self._console, auto_refresh=False, redirect_stdout=False,
                              redirect_stderr=True, transient=False)

    @property
    def console(self) -> Console | None:
        """The rich console of the live display (None when writing JSON lines)."""
        return self._console

    def follow(self, stats: Callable[[], PoolStatistics] | None) -> None:
        """Show the pool's figures from now on (None: no pool)."""
        self._stats = stats

    def follow_batches(self, batches: Callable[[], BatchRunStatistics] | None) -> None:
        """Show a batch run's batches from now on (None: none)."""
        self._batches = batches

    async def watch(self, stats: Callable[[], PoolStatistics] | None = None) -> None:
        """Refresh the display (or write a status line) until cancelled; ``stats``: the pool's figures, if any
        (see :meth:`follow`, :meth:`follow_batches`)."""
        if stats is not None:
            self._stats = stats
        if self.quiet:
            return
        if self._live is None:
            while True:
                await anyio.sleep(self.interval_s)
                self._status_line()
        with self._live:
            try:
                while True:
                    self._live.update(self._render(), refresh=True)
                    await anyio.sleep(0.25)
            finally:
                # The last frame shows the final counts.
                self._live.update(self._render(), refresh=True)

    # ------------------------------------------------------------------ figures

    def _figures(self) -> dict[str, Any]:
        counts, now = self.counts, self._clock()
        rate = self._rate.update(now, counts.done)
        remaining = max(0, counts.to_do - counts.done - counts.not_run)
        figures: dict[str, Any] = {
            "done": counts.done,
            "total": counts.to_do,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
            "elapsed_s": round(now - self.started, 1),
            "eta_s": round(remaining / rate, 1) if rate else None,
            "cost_usd": round(counts.cost_usd, 6),
            "tier": self.tier,
        }
        if self._batches is not None:
            run = self._batches()
            figures.update(
                batch_requests_left=run.requests_left,
                batch_refusals=run.refusals,
                batches=[{"part": b.part, "batch_id": b.batch_id, "status": b.status, "completed": b.completed,
                          "failed": b.failed, "total": b.total} for b in run.batches],
            )
        stats = self._stats() if self._stats is not None else None
        if stats is not None:
            rpm_limit, tpm_limit = _combined_limits(stats)
            figures.update(
                in_flight=stats.in_flight,
                queued=stats.queued,
                retries=stats.retries,
                rate_limited=stats.rate_limited,
                pauses=stats.pauses,
                capacity_refused=stats.capacity_refused,
                flex_fallbacks=stats.flex_fallbacks,
                requests_per_minute=round(stats.requests_per_minute),
                rpm_limit=rpm_limit or counts.server_rpm,
                tokens_per_minute=round(stats.tokens_per_minute),
                tpm_limit=tpm_limit or counts.server_tpm,
            )
            if len(stats.endpoints) > 1:
                figures["endpoints"] = [_endpoint_figures(e, counts) for e in stats.endpoints]
            if len({scope.model for scope in stats.scopes}) > 1:
                figures["scopes"] = [
                    {"endpoint": scope.endpoint, "model": scope.model,
                     "rpm_limit": scope.limits.rpm if scope.limits is not None else None,
                     "tpm_limit": scope.limits.tpm if scope.limits is not None else None}
                    for scope in stats.scopes
                ]
        return figures

    def _status_line(self) -> None:
        line = {"event": "run_progress", **self._figures()}
        _write_json(line)

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        f = self._figures()
        total = max(1, f["total"])
        share = f["done"] / total
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=total, completed=f["done"], width=40),
            Text(f"{f['done']:,}/{f['total']:,}  {share:.0%}", style="bold"),
            Text(f"ETA {_duration(f['eta_s'])}  elapsed {_duration(f['elapsed_s'])}", style="dim"),
        )
        failed = f"failed [{'red' if f['failed'] else 'green'}]{f['failed']}[/]"
        cost = f"{failed}   cost ~${f['cost_usd']:.4f} ({f['tier']})"
        parts: list[RenderableType] = [Text(self.title, style="bold cyan"), bar]
        if "batches" in f:
            parts.append(_batch_table(f["batches"], cost))
        if "in_flight" in f:
            grid = Table.grid(padding=(0, 3))
            grid.add_row(
                f"requests/min [bold]{f.get('requests_per_minute', 0):,}[/] / {_limit(f.get('rpm_limit'))}",
                f"tokens/min [bold]{f.get('tokens_per_minute', 0):,}[/] / {_limit(f.get('tpm_limit'))}",
            )
            capacity = f"   no capacity {f['capacity_refused']}" if f.get("capacity_refused") else ""
            grid.add_row(
                f"in flight [bold]{f.get('in_flight', 0)}[/]   queued {f.get('queued', 0)}",
                f"retries {f.get('retries', 0)}   429s {f.get('rate_limited', 0)}{capacity}   "
                f"pauses {f.get('pauses', 0)}   {cost}",
            )
            parts.append(grid)
        if "endpoints" in f:
            endpoints = Table.grid(padding=(0, 3))
            for e in f["endpoints"]:
                state = (f"[red]retired: {e['retired']}[/]" if e.get("retired") else
                         f"[yellow]circuit {e['circuit']}[/]" if e["circuit"] != "closed" else "[green]ok[/]")
                endpoints.add_row(f"[bold]{e['name']}[/]", f"answered {e['answered']:,}",
                                  f"requests {e['requests']:,}", f"failures {e['failures']:,}", state)
            parts.append(endpoints)
        if "scopes" in f:
            scopes = Table.grid(padding=(0, 3))
            for scope in f["scopes"]:
                scopes.add_row(f"{scope['model']} @ {scope['endpoint']}",
                               f"limits {_limit(scope['rpm_limit'])} RPM, {_limit(scope['tpm_limit'])} TPM")
            parts.append(scopes)
        return Group(*parts)

    # ------------------------------------------------------------------ the end

    def say(self, text: str, event: str) -> None:
        """Tell the user something while the run goes on: a line above the live display, else a JSON line."""
        if self.quiet:
            return
        if self._console is not None:
            self._console.print(text, style="yellow", highlight=False, markup=False)
        else:
            _write_json({"event": event, "message": text})

    def summary(self, figures: dict[str, Any], message: str) -> None:
        """Write the run's summary: a table on a terminal, one JSON line otherwise; with ``quiet``, the message
        alone when the run did not fully succeed (``figures["exit_code"]`` is not 0)."""
        if self.quiet:
            if figures.get("exit_code"):
                sys.stderr.write(f"scheduler run: {message}\n")
                sys.stderr.flush()
            return
        if self._console is None:
            _write_json({"event": "run_summary", **figures, "message": message})
            return
        from rich.table import Table

        table = Table(title="scheduler run", show_header=False, title_justify="left")
        for key, value in figures.items():
            if value is not None and key in _LABELS and (value or key not in _ONLY_IF_ANY):
                label, show = _LABELS[key]
                table.add_row(label, show(value))
        for e in figures.get("endpoints") or ():
            retired = f", retired: {e['retired']}" if e.get("retired") else ""
            table.add_row(f"endpoint {e['name']}", f"{e['answered']:,} answered, {e['requests']:,} requests, "
                          f"{e['failures']:,} failures{retired}")
        self._console.print(table)
        style = "green" if figures.get("exit_code") == 0 else "yellow"
        self._console.print(message, style=style, highlight=False, markup=False)


_BATCH_ROWS = 8  # batches shown; the rest are summed up in one line


def _batch_table(batches: list[dict[str, Any]], cost: str) -> RenderableType:
    """The batches of a run: the unfinished ones first (up to a few), then a line for the rest."""
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    ended = ("completed", "failed", "expired", "cancelled")
    shown = sorted(batches, key=lambda b: (b["status"] in ended, b["part"]))[:_BATCH_ROWS]
    for b in shown:
        table.add_row(f"batch {b['part']}", b["batch_id"] or "-", f"[bold]{b['status']}[/]",
                      f"{b['completed']:,}/{b['total']:,} done", f"{b['failed']:,} failed" if b["failed"] else "")
    if len(batches) > len(shown):
        done = sum(1 for b in batches if b["status"] in ended)
        table.add_row(f"... {len(batches) - len(shown)} more", "", f"{done} of {len(batches)} ended", "", "")
    table.add_row("", "", "", "", cost)
    return table


def endpoint_summary(stats: PoolStatistics | None, counts: RunCounts) -> list[dict[str, Any]] | None:
    """What each endpoint did, for the summary (None with a single endpoint: the run's figures say it all)."""
    if stats is None or len(stats.endpoints) < 2:
        return None
    return [_endpoint_figures(e, counts) for e in stats.endpoints]


def _endpoint_figures(e: EndpointStatistics, counts: RunCounts) -> dict[str, Any]:
    figures: dict[str, Any] = {"name": e.name, "answered": counts.answered_by.get(e.name, 0), "requests": e.requests,
                               "failures": e.failures, "circuit": e.circuit}
    if e.retired is not None:
        figures["retired"] = e.retired
    if e.concurrency is not None:
        figures["concurrency"] = e.concurrency
    return figures


def _combined_limits(stats: PoolStatistics) -> tuple[int | None, int | None]:
    """The limits the run works under: with several endpoints, the sum of theirs (each endpoint's first model's
    limits; retired endpoints left out); else the pool's. Models are not summed: a server may hold one limit for
    all of them, and their own lines show each."""
    if len(stats.endpoints) < 2:
        limits = stats.limits
        return (limits.rpm, limits.tpm) if limits is not None else (None, None)
    retired = {e.name for e in stats.endpoints if e.retired is not None}
    first: dict[str, Limits] = {}
    for scope in stats.scopes:
        if scope.limits is not None and scope.endpoint not in retired:
            first.setdefault(scope.endpoint, scope.limits)
    rpms = [limits.rpm for limits in first.values() if limits.rpm is not None]
    tpms = [limits.tpm for limits in first.values() if limits.tpm is not None]
    return sum(rpms) or None, sum(tpms) or None


def _write_json(line: dict[str, Any]) -> None:
    sys.stderr.buffer.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
    sys.stderr.buffer.flush()


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _limit(value: int | None) -> str:
    return f"{value:,}" if value is not None else "?"


def _number(value: Any) -> str:
    return f"{value:,}"


def _seconds(value: Any) -> str:
    return f"{value:,.2f} s"


def _usd(value: Any) -> str:
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def _by_tier(value: Any) -> str:
    return ", ".join(f"{tier} {_usd(usd)}" for tier, usd in value.items())


#: rows of the summary table left out when zero
_ONLY_IF_ANY = frozenset({"already_done", "invalid_lines", "not_done", "truncated", "retries", "rate_limited",
                          "pauses", "earlier_cost_usd", "capacity_refused", "flex_fallbacks", "batches",
                          "batch_refusals", "batch_retried", "batches_running", "saved_usd", "trimmed"})
#: the summary table's rows: the JSON summary's keys, with what a person reads for them
_LABELS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "input": ("input", str),
    "output": ("output", str),
    "tier": ("tier", str),
    "requests": ("requests in the input", _number),
    "already_done": ("already done by earlier runs", _number),
    "succeeded": ("succeeded", _number),
    "failed": ("failed", _number),
    "invalid_lines": ("of which invalid lines", _number),
    "not_done": ("not done yet", _number),
    "truncated": ("answers cut short by max_tokens", _number),
    "prompt_tokens": ("prompt tokens", _number),
    "completion_tokens": ("completion tokens", _number),
    "retries": ("retries", _number),
    "rate_limited": ("429 answers", _number),
    "pauses": ("pauses for a 429", _number),
    "capacity_refused": ("429s for missing capacity (flex)", _number),
    "flex_fallbacks": ("flex requests sent at standard", _number),
    "batches": ("batches", _number),
    "batch_refusals": ("batches refused for the token limit", _number),
    "batch_retried": ("lines retried in a later batch", _number),
    "batches_running": ("batches still running", _number),
    "trimmed": ("chats trimmed to fit the context window", _number),
    "token_ratio": ("server tokens per token of our estimate", lambda v: f"{v:.3f}"),
    "cost_usd": ("cost of this run", _usd),
    "cost_by_tier": ("cost by tier", _by_tier),
    "saved_usd": ("saved against standard prices", _usd),
    "earlier_cost_usd": ("cost of earlier runs", _usd),
    "first_request_s": ("first request sent after", _seconds),
    "elapsed_s": ("elapsed", _seconds),
    "exit_code": ("exit code", str),
}
