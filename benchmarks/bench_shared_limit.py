"""Shared limits and limit efficiency through the CLI, as users run it: one process, one through Redis, four
sharing one limit through Redis, and four without Redis (each told the whole limit, or a quarter of it).

The mock server runs in its own process, enforcing RPM/TPM like OpenAI (one-second quantization, 429s) and
counting tokens from characters (about 20% more than tiktoken, as OpenAI's limiter does). Each set-up runs the
same 2,000 chat completions with ``scheduler run IN -o OUT --base-url ... --rpm ... --tpm ...`` as subprocesses:

- ``local``: one process, the whole input;
- ``redis1``: one process sharing its limits through Redis (``--redis``): the shared path's own cost;
- ``redis4``: four processes, a quarter of the input each, each told the whole limit, sharing it through Redis;
- ``full4``: the same four without Redis: together they send four times too much (what Redis prevents);
- ``quarter4``: the same four without Redis, each told a quarter of the limit (the manual split).

The theoretical minimum is ``max(N / RPM, server-counted tokens / TPM)`` minutes; a run's time is from its first
request leaving to its last result written (each process's summary says when both happened, so start-up, which
``first request s`` reports, is measured apart). Efficiency is minimum / time; it can come out a little above 1,
since the server's buckets start full. ``--runs N`` repeats every set-up; the report gives every run, the median
and the worst.

Run: ``python benchmarks/bench_shared_limit.py [--runs 10] [--setups local,redis1,redis4,full4,quarter4]
[--requests 2000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    chat_line,
    machine,
    mock_server,
    private_redis,
    prompts,
    reset,
    stats,
    table,
    write_json,
)


def write_inputs(folder: Path, count: int, parts: int, max_tokens: int) -> list[Path]:
    """``count`` chat completions in Batch API lines, split into ``parts`` files."""
    texts = prompts(count)
    paths = [folder / f"part-{i}.jsonl" for i in range(parts)]
    files = [path.open("wb") for path in paths]
    try:
        for i, text in enumerate(texts):
            files[i % parts].write(chat_line(f"r{i:06d}", text, max_tokens))
    finally:
        for file in files:
            file.close()
    return paths


def run_once(base_url: str, inputs: list[Path], folder: Path, args: argparse.Namespace, redis_url: str | None,
             share: int = 1) -> dict[str, Any]:
    """Every part's CLI process at once; the server's counters and each process's summary."""
    reset(base_url)
    env = {**os.environ, "OPENAI_API_KEY": "mock-key"}
    procs = []
    for i, path in enumerate(inputs):
        out = folder / f"out-{i}.jsonl"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "scheduler", "run", str(path), "-o", str(out), "--base-url", base_url,
               "--rpm", str(args.rpm // share), "--tpm", str(args.tpm // share), "--workers", str(args.workers)]
        if redis_url is not None:
            cmd += ["--redis", redis_url]
        started = time.time()
        procs.append((started, out, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                       stderr=subprocess.PIPE, text=True)))
    firsts, ends, failed, lines, first_request, ratios = [], [], 0, 0, [], []
    for started, out, proc in procs:
        _, err = proc.communicate(timeout=args.timeout)
        summary = next(json.loads(line) for line in err.splitlines() if '"run_summary"' in line)
        firsts.append(started + summary["first_request_s"])
        ends.append(started + summary["elapsed_s"])
        first_request.append(summary["first_request_s"])
        ratios.append(summary.get("token_ratio") or 1.0)
        failed += summary["failed"]
        lines += sum(1 for _ in out.open("rb"))
    seen = stats(base_url)
    wall = max(ends) - min(firsts)
    minimum = 60.0 * max(args.requests / args.rpm, seen["admitted_tokens"] / args.tpm)
    return {
        "wall_s": round(wall, 3), "minimum_s": round(minimum, 3),
        "efficiency": round(minimum / wall, 4) if failed == 0 and lines == args.requests else None,
        "429s": seen["rate_limited"], "429_pct": round(100.0 * seen["rate_limited"] / args.requests, 3),
        "failed": failed, "lines": lines, "first_request_s": round(max(first_request), 3),
        "token_ratio": "/".join(f"{r:.2f}" for r in ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--setups", default="local,redis1,redis4,full4,quarter4")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "shared_limit.json")
    args = parser.parse_args()
    setups = args.setups.split(",")
    if any(s.startswith("redis") for s in setups) and shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server), needed by the redis set-ups")
    mock_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms),
                 "--latency-sigma", "0.3"]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base_url = stack.enter_context(mock_server(*mock_args))
        redis = stack.enter_context(private_redis()) if any(s.startswith("redis") for s in setups) else None
        for run in range(1, args.runs + 1):
            for setup in setups:
                (folder / setup).mkdir(exist_ok=True)
                parts = 4 if setup.endswith("4") else 1
                inputs = write_inputs(folder / setup, args.requests, parts, args.max_tokens)
                # A fresh database a run: no state left from the last one.
                url = f"{redis.rsplit('/', 1)[0]}/{run % 16}" if redis and setup.startswith("redis") else None
                share = 4 if setup == "quarter4" else 1
                row = {"setup": setup, "run": run, **run_once(base_url, inputs, folder / setup, args, url, share)}
                rows.append(row)
                print(table([row], list(row)), flush=True)
    summary = []
    for setup in setups:
        runs = [r for r in rows if r["setup"] == setup]
        effs = [r["efficiency"] or 0.0 for r in runs]
        summary.append({"setup": setup, "runs": len(runs), "median_efficiency": round(statistics.median(effs), 4),
                        "worst_efficiency": round(min(effs), 4), "max_429_pct": max(r["429_pct"] for r in runs),
                        "failed": sum(r["failed"] for r in runs)})
    print()
    print(table(summary, list(summary[0])))
    write_json(args.json, {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "rows": rows,
                           "summary": summary})


if __name__ == "__main__":
    main()
