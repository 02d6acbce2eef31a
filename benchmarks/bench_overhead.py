"""Scheduler overhead: jobs per second through queue, buckets and workers, with a transport that answers at once.

No network, limits far above: what is left is the pool's own CPU per job (building the body, the token estimate,
queueing, admission, the worker task, the result). Measured through ``pool.map``; through ``submit()`` as a
service calls it (a few hundred callers, each awaiting its answer before it submits again); and through every job
``submit()``-ed at once and gathered. The last pattern keeps every job, its task and its coroutine alive together,
so Python's cyclic garbage collector walks them again and again: ``asyncio_gather_baseline`` is what the same
gather costs with a no-op coroutine in place of ``submit()``, the share of that figure that is not the pool's.
Then one ``map`` run under cProfile shows where the time goes, and the cost of a token estimate (tiktoken on
typical prompts; the cache-hit path of repeated texts).

Usage: python benchmarks/bench_overhead.py [--jobs 50000] [--workers 64] [--no-profile] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import pstats
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import MODEL, RESULTS, prompts, quiet_logs, table, write_json

import scheduler
from scheduler.tokens import TokenEstimator
from scheduler.transport import Response, StreamResponse

CHAT = "/v1/chat/completions"
_BODY = {
    "id": "chatcmpl-overhead", "object": "chat.completion", "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
}
_ANSWER = Response(200, {}, _BODY, "req_overhead")
UNLIMITED = scheduler.Limits(rpm=10**9, tpm=10**12)


class InstantTransport:
    """Answers every request at once with the same 200: measures the pool, not a network or a fake."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response:
        self.sent += 1
        return _ANSWER

    def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> contextlib.AbstractAsyncContextManager[StreamResponse]:
        raise NotImplementedError("the overhead benchmark does not stream")


def _pool(workers: int) -> tuple[scheduler.Pool, InstantTransport]:
    transport = InstantTransport()
    pool = scheduler.Pool(transport=transport, model=MODEL, limits=UNLIMITED, workers=workers)
    return pool, transport


async def via_map(texts: list[str], workers: int) -> dict[str, Any]:
    """Every text through ``pool.map``; returns jobs/s (by completed jobs) and what came back."""
    pool, transport = _pool(workers)
    bodies = [{"messages": [{"role": "user", "content": text}], "max_tokens": 16} for text in texts]
    async with pool:
        began, cpu = time.perf_counter(), time.process_time()
        yielded = ok = 0
        async for result in pool.map(bodies):
            yielded += 1
            ok += result.ok
        # Timed to the last completion, not to the last yield: see "yielded" in the report.
        done = pool.statistics().succeeded
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return _figures("map", len(texts), wall, cpu, done, transport.sent, yielded=yielded, ok=ok)


async def via_submit(texts: list[str], workers: int) -> dict[str, Any]:
    """Every text as its own concurrent ``submit()``, all at once, gathered."""
    pool, transport = _pool(workers)
    async with pool:
        began, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(pool.submit(text, max_tokens=16) for text in texts))
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    ok = sum(r.ok for r in results)
    return _figures("submit, all gathered", len(texts), wall, cpu, ok, transport.sent, yielded=len(results), ok=ok)


async def via_callers(texts: list[str], workers: int, callers: int = 512) -> dict[str, Any]:
    """``callers`` concurrent callers, each submitting its next text once its last answer is back (a service)."""
    pool, transport = _pool(workers)
    pending = iter(texts)

    async def caller() -> int:
        return sum([(await pool.submit(text, max_tokens=16)).ok for text in pending])

    async with pool:
        began, cpu = time.perf_counter(), time.process_time()
        ok = sum(await asyncio.gather(*(caller() for _ in range(callers))))
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return _figures(f"submit, {callers} callers", len(texts), wall, cpu, ok, transport.sent, yielded=ok, ok=ok)


async def gather_baseline(jobs: int) -> dict[str, Any]:
    """What gathering ``jobs`` coroutines costs when each only awaits a future the loop resolves: no pool."""
    loop = asyncio.get_running_loop()

    async def no_op(i: int) -> int:
        answer: asyncio.Future[int] = loop.create_future()
        loop.call_soon(answer.set_result, i)
        return await answer

    began, cpu = time.perf_counter(), time.process_time()
    done = len(await asyncio.gather(*(no_op(i) for i in range(jobs))))
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    return _figures("asyncio_gather_baseline", jobs, wall, cpu, done, 0, yielded=done, ok=done)


def _figures(mode: str, jobs: int, wall: float, cpu: float, done: int, sent: int, **extra: int) -> dict[str, Any]:
    # Jobs per CPU-second is what one core would do with nothing else running: on a busy machine wall time
    # also counts the time other processes had the core.
    return {"mode": mode, "jobs": jobs, "done": done, "sent": sent, "wall_s": round(wall, 3),
            "jobs_per_s": round(done / wall), "cpu_us_per_job": round(1e6 * cpu / max(done, 1), 1),
            "jobs_per_cpu_s": round(done / cpu) if cpu else None, **extra}


def profile(texts: list[str], workers: int, top: int = 15) -> dict[str, Any]:
    """One ``map`` run under cProfile: own time by package, and the top functions by own and cumulative time.

    Shares are of the profiled total; cProfile slows the run about threefold, so they are indicative.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(via_map(texts, workers))
    profiler.disable()
    entries = pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]
    rows = [{"function": _where(filename, line, name), "calls": calls, "own_s": own, "cumulative_s": cumulative}
            for (filename, line, name), (_, calls, own, cumulative, _) in entries]
    total = sum(row["own_s"] for row in rows)
    for row in rows:
        row["own_pct"] = round(100 * row["own_s"] / total, 1)
        row["cumulative_pct"] = round(100 * row["cumulative_s"] / total, 1)
        row["own_s"], row["cumulative_s"] = round(row["own_s"], 3), round(row["cumulative_s"], 3)
    areas: dict[str, float] = {}
    for row in rows:
        areas[_area(row["function"])] = areas.get(_area(row["function"]), 0.0) + row["own_s"]
    ranked = sorted(areas.items(), key=lambda item: -item[1])
    by_area = [*ranked[:10], ("(everything else)", sum(own for _, own in ranked[10:]))]
    # The event loop's own frames count every resumed coroutine again: left out of the cumulative list.
    plumbing = ("asyncio/base_events.py", "asyncio/events.py", "'run' of '_contextvars", "_run_coro")
    cumulative = [row for row in rows if not any(p in row["function"] for p in plumbing)]
    return {
        "jobs": len(texts),
        "total_s": round(total, 3),
        "by_area": [{"area": area, "own_s": round(own, 3), "own_pct": round(100 * own / total, 1)}
                    for area, own in by_area],
        "by_own_time": sorted(rows, key=lambda row: -row["own_s"])[:top],
        "by_cumulative": sorted(cumulative, key=lambda row: -row["cumulative_s"])[:top],
    }


def _where(filename: str, line: int, name: str) -> str:
    short = filename.split("site-packages/")[-1].split("lib/python3.11/")[-1]
    short = short.replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    return f"{short}:{line}({name})"


def _area(function: str) -> str:
    """The module (scheduler) or package (others) a profiled function belongs to."""
    if function.startswith("scheduler/"):
        return function.split(":")[0]
    if function.startswith("~"):
        return "builtins (C)"
    return function.split("/")[0].split(":")[0]


def estimate_cost(count: int = 2000) -> list[dict[str, Any]]:
    """Microseconds per token estimate: new texts (tiktoken runs), the same texts again (the cache answers).

    ``count`` stays below the estimator's cache size (4096 texts), or the second pass would miss too.
    """
    estimator = TokenEstimator()
    TokenEstimator.preload(MODEL)
    rows = []
    for label, words, n in (("typical prompt (20-60 words)", (20, 60), count),
                            ("long prompt (400-600 words)", (400, 600), count // 10)):
        texts = prompts(n, seed=7, words=words)
        bodies = [{"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16} for text in texts]
        row: dict[str, Any] = {"prompt": label, "chars": round(sum(map(len, texts)) / n)}
        for pass_name in ("tiktoken_us", "cache_hit_us"):
            began = time.perf_counter()
            for body in bodies:
                estimator.estimate(CHAT, body)
            row[pass_name] = round(1e6 * (time.perf_counter() - began) / n, 1)
        rows.append(row)
    return rows


async def _warm_up(workers: int) -> None:
    # The first pool loads the encoding and warms imports: not part of any figure.
    await via_map(prompts(200, seed=99), workers)


def run(jobs: int = 50_000, workers: int = 64, with_profile: bool = True) -> dict[str, Any]:
    """The whole overhead benchmark; returns its figures."""
    quiet_logs(logging.INFO)  # filtered below INFO, as asked of a production setup: debug logs are not measured
    asyncio.run(_warm_up(workers))
    texts = prompts(jobs, seed=1)
    runs = [asyncio.run(via_map(texts, workers)), asyncio.run(via_callers(prompts(jobs, seed=4), workers)),
            asyncio.run(via_submit(prompts(jobs, seed=2), workers)), asyncio.run(gather_baseline(jobs))]
    out: dict[str, Any] = {"jobs": jobs, "workers": workers, "runs": runs, "estimates": estimate_cost()}
    if with_profile:
        out["profile"] = profile(prompts(min(jobs, 20_000), seed=3), workers)
    return out


def report(out: dict[str, Any]) -> str:
    columns = ("mode", "jobs", "done", "yielded", "wall_s", "jobs_per_s", "cpu_us_per_job", "jobs_per_cpu_s")
    lines = [table(out["runs"], columns), ""]
    lines.append(table(out["estimates"], ("prompt", "chars", "tiktoken_us", "cache_hit_us")))
    for run_ in out["runs"]:
        if run_["yielded"] != run_["jobs"]:
            lines.append(f"\nWARNING: {run_['mode']} returned {run_['yielded']} results for {run_['jobs']} jobs")
    if "profile" in out:
        profile_ = out["profile"]
        lines.append(f"\ncProfile of one map run of {profile_['jobs']:,} jobs ({profile_['total_s']} s profiled):")
        lines.append(table(profile_["by_area"], ("area", "own_s", "own_pct")))
        for label in ("by_own_time", "by_cumulative"):
            lines.append(f"\ntop 15 {label.replace('_', ' ')}:")
            lines.append(table(profile_[label], ("function", "calls", "own_s", "own_pct", "cumulative_s",
                                                 "cumulative_pct")))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args()
    out = run(args.jobs, args.workers, not args.no_profile)
    print(report(out))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
