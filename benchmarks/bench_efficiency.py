"""Limit efficiency: how close a bulk workload gets to the theoretical minimum time under RPM/TPM limits.

A mock server in its own process enforces the limits like OpenAI (one-second quantization, 429s with
retry-after, lognormal latency). Three clients run the same N chat completions, one after the other, with the
mock's counters reset in between:

- ``scheduler``: ``scheduler.Pool`` with the limits, 128 workers;
- ``naive``: ``asyncio.gather`` over an ``asyncio.Semaphore(64)``, the SDK's own retries (``max_retries=2``);
- ``aiolimiter``: two ``aiolimiter.AsyncLimiter`` (RPM and TPM) acquiring a tiktoken estimate, SDK retries on.

The theoretical minimum is ``max(N / RPM, server-counted tokens / TPM)`` minutes (tokens from the mock's
``admitted_tokens``); efficiency is that over the wall time. It can come out a little above 1: the server's
buckets start full, so the first second's burst is free. 429s and retries are counted by the server (retries:
requests it received beyond N), so every client is measured alike.

Variants: ``base``; ``faults`` (the mock fails 2% of requests with 5xx and drops 1% of connections); ``over``
(every client is configured with limits 20% above the server's).

Usage: python benchmarks/bench_efficiency.py [--requests 2000] [--rpm 6000] [--tpm 600000] [--latency-ms 200]
           [--variants base,faults,over] [--clients scheduler,naive,aiolimiter] [--plot PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import MODEL, RESULTS, mock_server, prompts, quiet_logs, reset, stats, table, write_json

import scheduler

CONCURRENCY_NAIVE = 64
WORKERS = 128


@dataclass(frozen=True, slots=True)
class Workload:
    """One run's server and workload."""

    requests: int = 2000
    rpm: int = 6000
    tpm: int = 600_000
    latency_ms: float = 200.0
    latency_sigma: float = 0.3
    max_tokens: int = 50
    error_rate: float = 0.0
    drop_rate: float = 0.0
    #: the clients are configured with the server's limits times this
    limit_factor: float = 1.0
    #: the aiolimiter client's window: 1 s (a careful user) or 60 s (the limit as stated, per minute)
    aiolimiter_period_s: float = 1.0

    def mock_args(self) -> list[str]:
        return ["--rpm", str(self.rpm), "--tpm", str(self.tpm), "--latency-ms", str(self.latency_ms),
                "--latency-sigma", str(self.latency_sigma), "--error-rate", str(self.error_rate),
                "--drop-rate", str(self.drop_rate)]

    @property
    def client_rpm(self) -> int:
        return round(self.rpm * self.limit_factor)

    @property
    def client_tpm(self) -> int:
        return round(self.tpm * self.limit_factor)

    def time_limit_s(self) -> float:
        """A generous bound on one client's run, so a stuck client cannot stall the suite."""
        return 60.0 + 4 * 60.0 * max(self.requests / self.rpm, self.requests * 150 / self.tpm)


#: the variants and what they change
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "faults": {"error_rate": 0.02, "drop_rate": 0.01},
    "over": {"limit_factor": 1.2},
}


@dataclass(slots=True)
class Outcome:
    """What a client saw: its wall time and the requests that failed, by kind."""

    wall_s: float
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    timed_out: bool = False


Start = Callable[[], None]
Client = Callable[[str, list[str], Workload, Start], Coroutine[Any, Any, Outcome]]


def _sdk(base_url: str, max_retries: int = 2) -> Any:
    import openai

    # The same aiohttp transport for every client: the comparison is about handling the limits, not HTTP.
    return openai.AsyncOpenAI(base_url=base_url, api_key="mock", max_retries=max_retries,
                              http_client=openai.DefaultAioHttpClient())


async def run_scheduler(base_url: str, texts: list[str], w: Workload, start: Start) -> Outcome:
    """The scheduler as documented: a Pool with the limits, submits gathered."""
    client = _sdk(base_url)
    limits = scheduler.Limits(rpm=w.client_rpm, tpm=w.client_tpm)
    pool = scheduler.Pool(client=client, model=MODEL, limits=limits, workers=WORKERS)
    async with client, pool:
        start()
        began = time.perf_counter()
        jobs = [pool.submit(text, max_tokens=w.max_tokens, raise_errors=False) for text in texts]
        try:
            async with asyncio.timeout(w.time_limit_s()):
                results = await asyncio.gather(*jobs)
        except TimeoutError:
            pool.stop("benchmark time limit")
            return Outcome(time.perf_counter() - began, collections.Counter(timeout=len(texts)), True)
        wall = time.perf_counter() - began
    return Outcome(wall, collections.Counter(r.error.code for r in results if r.error is not None))


async def run_naive(base_url: str, texts: list[str], w: Workload, start: Start) -> Outcome:
    """What most code does: gather everything behind a semaphore, let the SDK retry (twice, by default)."""
    client = _sdk(base_url)
    semaphore = asyncio.Semaphore(CONCURRENCY_NAIVE)

    async def one(text: str) -> Any:
        async with semaphore:
            return await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=w.max_tokens
            )

    async with client:
        return await _gather(start, [one(text) for text in texts], w)


async def run_aiolimiter(base_url: str, texts: list[str], w: Workload, start: Start) -> Outcome:
    """A careful client: one leaky bucket for RPM and one for TPM, each acquiring a tiktoken estimate.

    By default the limiters hold one second's worth of the limit, as providers enforce per-minute limits over
    short slices; ``--aiolimiter-period 60`` gives ``AsyncLimiter(rpm, 60)``, which allows a minute's burst.
    """
    import tiktoken
    from aiolimiter import AsyncLimiter

    encoding = tiktoken.encoding_for_model(MODEL)
    client = _sdk(base_url)
    period = w.aiolimiter_period_s
    requests = AsyncLimiter(w.client_rpm * period / 60, period)
    tokens = AsyncLimiter(w.client_tpm * period / 60, period)

    async def one(text: str) -> Any:
        estimate = len(encoding.encode(text)) + w.max_tokens
        await requests.acquire()
        await tokens.acquire(estimate)
        return await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=w.max_tokens
        )

    async with client:
        return await _gather(start, [one(text) for text in texts], w)


async def _gather(start: Start, jobs: list[Awaitable[Any]], w: Workload) -> Outcome:
    start()
    began = time.perf_counter()
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        async with asyncio.timeout(w.time_limit_s()):
            results = await asyncio.gather(*tasks, return_exceptions=True)
    except TimeoutError:
        results = [t.exception() if t.done() and not t.cancelled() else TimeoutError() for t in tasks]
        return Outcome(time.perf_counter() - began, _failures(results), True)
    return Outcome(time.perf_counter() - began, _failures(results))


def _failures(results: Sequence[Any]) -> collections.Counter[str]:
    return collections.Counter(type(r).__name__ for r in results if isinstance(r, BaseException))


CLIENTS: dict[str, Client] = {"scheduler": run_scheduler, "naive": run_naive, "aiolimiter": run_aiolimiter}


def run_variant(name: str, w: Workload, clients: Sequence[str], texts: list[str]) -> dict[str, Any]:
    """Run each client on the same workload against one mock server; return rows and per-second timelines."""
    rows, timelines = [], {}
    with mock_server(*w.mock_args()) as base_url:
        for client in clients:
            outcome = asyncio.run(CLIENTS[client](base_url, texts, w, lambda: reset(base_url)))
            seen = stats(base_url)
            rows.append(_row(name, client, w, outcome, seen))
            timelines[client] = seen["timeline"]
    return {"variant": name, "workload": dataclasses.asdict(w), "rows": rows, "timelines": timelines}


def _row(variant: str, client: str, w: Workload, outcome: Outcome, seen: dict[str, Any]) -> dict[str, Any]:
    minimum = 60.0 * max(w.requests / w.rpm, seen["admitted_tokens"] / w.tpm)
    failed = sum(outcome.failures.values())
    return {
        "variant": variant,
        "client": client,
        "requests": w.requests,
        "wall_s": round(outcome.wall_s, 3),
        "minimum_s": round(minimum, 3),
        # Only a run where every request succeeded did the whole work: a client that gave up is not "efficient".
        "efficiency": round(minimum / outcome.wall_s, 4) if failed == 0 else None,
        "429s": seen["rate_limited"],
        "429_pct": round(100.0 * seen["rate_limited"] / w.requests, 2),
        "retries": seen["requests"] - w.requests,
        "failed": failed,
        "failures": dict(outcome.failures),
        "server_errors": seen["server_errors"],
        "dropped": seen["dropped"],
        "server_tokens": seen["admitted_tokens"],
        "timed_out": outcome.timed_out,
    }


COLUMNS = ("variant", "client", "wall_s", "minimum_s", "efficiency", "429s", "429_pct", "retries", "failed")


def plot(variant: dict[str, Any], path: Path) -> None:
    """Admitted requests and tokens per second (and 429s) over time, one line per client, against the limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = variant["workload"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True, height_ratios=(3, 3, 2))
    panels = (("requests", "admitted requests / s", w["rpm"] / 60), ("tokens", "admitted tokens / s", w["tpm"] / 60),
              ("rate_limited", "429s / s", None))
    colours = {"scheduler": "tab:blue", "naive": "tab:red", "aiolimiter": "tab:orange"}
    rows = {row["client"]: row for row in variant["rows"]}
    for axis, (key, label, limit) in zip(axes, panels, strict=True):
        for client, timeline in variant["timelines"].items():
            row = rows[client]
            legend = f"{client}: {row['wall_s']:.1f} s, {row['429s']} 429s, {row['failed']} failed"
            seconds = [point["t"] + 0.5 for point in timeline]
            axis.step(seconds, [point[key] for point in timeline], where="mid", color=colours.get(client),
                      label=legend, linewidth=1.6 if client == "scheduler" else 1.1)
        if limit is not None:
            axis.axhline(limit, color="black", linestyle="--", linewidth=1, label="server limit")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the client started")
    minimum = rows[next(iter(rows))]["minimum_s"]
    fig.suptitle(f"{w['requests']:,} chat completions, {w['rpm']:,} RPM / {w['tpm']:,} TPM "
                 f"(1 s quantization, ~{w['latency_ms']:.0f} ms latency); theoretical minimum ~{minimum:.1f} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(variants: Sequence[str], clients: Sequence[str], base: Workload, variant_requests: int | None = None,
        plot_path: Path | None = RESULTS / "efficiency.png") -> list[dict[str, Any]]:
    """Run the variants (``variant_requests`` sizes the non-base ones) and plot the base one."""
    quiet_logs(logging.ERROR)
    done = []
    for name in variants:
        w = dataclasses.replace(base, **VARIANTS[name])
        if name != "base" and variant_requests is not None:
            w = dataclasses.replace(w, requests=variant_requests)
        done.append(run_variant(name, w, clients, prompts(w.requests)))
        print(table(done[-1]["rows"], COLUMNS), flush=True)
    if plot_path is not None and done and done[0]["variant"] == "base":
        plot(done[0], plot_path)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--variant-requests", type=int, default=None, help="requests of the non-base variants")
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--variants", default="base,faults,over", help=f"some of {','.join(VARIANTS)}")
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"some of {','.join(CLIENTS)}")
    parser.add_argument("--aiolimiter-period", type=float, default=1.0, help="the aiolimiter client's window (s)")
    parser.add_argument("--plot", type=Path, default=RESULTS / "efficiency.png", help="PNG of the base variant")
    parser.add_argument("--json", type=Path, default=RESULTS / "efficiency.json")
    args = parser.parse_args()
    base = Workload(requests=args.requests, rpm=args.rpm, tpm=args.tpm, latency_ms=args.latency_ms,
                    max_tokens=args.max_tokens, aiolimiter_period_s=args.aiolimiter_period)
    variants = [v for v in args.variants.split(",") if v]
    clients = [c for c in args.clients.split(",") if c]
    unknown = (set(variants) - set(VARIANTS)) | (set(clients) - set(CLIENTS))
    if unknown:
        parser.error(f"unknown variant or client: {', '.join(sorted(unknown))}")
    done = run(variants, clients, base, args.variant_requests, args.plot)
    write_json(args.json, done)
    print(f"results: {args.json}" + (f", plot: {args.plot}" if variants[:1] == ["base"] else ""))


if __name__ == "__main__":
    main()
