"""Shared limit: four processes spending one RPM/TPM budget, with and without Redis.

A mock server in its own process enforces the limits like OpenAI (one-second quantization, 429s). Four client
processes each run a quarter of N chat completions through ``scheduler.Pool`` (32 workers each), started
together once every process is ready (tokenizer loaded, SDK warmed up unless ``--cold``). Three set-ups:

- ``redis``: every process configured with the whole limit, ``Pool(redis=URL)``: one budget shared in Redis;
- ``full``: every process configured with the whole limit, no Redis: together they send four times too much;
- ``quarter``: every process configured with a quarter of the limit, no Redis: the manual split.

The theoretical minimum is ``max(N / RPM, server-counted tokens / TPM)`` minutes; efficiency is that over the
wall time from the start signal to the last result (the time to the processes' exit is shown beside it). 429s are
counted by the server.

Usage: python benchmarks/bench_shared_limit.py [--requests 2000] [--rpm 6000] [--tpm 600000] [--latency-ms 200]
           [--processes 4] [--setups redis,full,quarter] [--redis URL] [--cold]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import free_port, mock_server, prompts, reset, stats

SETUPS = ("redis", "full", "quarter")


async def child(args: argparse.Namespace) -> None:
    """One client process: warm up, say ready, wait for the start line on stdin, run its share, report."""
    import openai
    import structlog

    import scheduler
    from scheduler.transport import OpenAITransport

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    texts = prompts(args.requests)[args.index::args.processes]
    share = args.processes if args.setup == "quarter" else 1
    limits = scheduler.Limits(rpm=args.rpm // share, tpm=args.tpm // share)
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
    pool = scheduler.Pool(client=client, model="gpt-4o-mini", limits=limits, workers=args.workers,
                          redis=args.redis if args.setup == "redis" else None)
    async with client, pool:
        if not args.cold:
            # The SDK's first call spends a few hundred ms setting itself up: not what is measured here (--cold).
            await OpenAITransport(client).send("/v1/chat/completions", {
                "model": "gpt-4o-mini", "max_tokens": 1, "messages": [{"role": "user", "content": "warm-up"}]
            }, timeout=30)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        results = await asyncio.gather(
            *(pool.submit(text, max_tokens=args.max_tokens, raise_errors=False) for text in texts)
        )
        finished = time.time()
        statistics = pool.statistics()
    print("RESULT " + json.dumps({"finished": finished, "failed": sum(not r.ok for r in results),
                                  "rate_limited": statistics.rate_limited, "ratio": statistics.token_ratio}),
          flush=True)


def run_setup(setup: str, base_url: str, redis_url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Run the four processes of one set-up; the server's and the clients' figures."""
    if setup == "redis":
        assert redis_url is not None
        import redis

        with redis.Redis.from_url(redis_url) as connection:
            connection.flushdb()  # the last run's bucket is not this run's
    command = [sys.executable, __file__, "--child", "--setup", setup, "--base-url", base_url,
               "--redis", redis_url or "", "--requests", str(args.requests), "--rpm", str(args.rpm),
               "--tpm", str(args.tpm), "--processes", str(args.processes), "--workers", str(args.workers),
               "--max-tokens", str(args.max_tokens), *(["--cold"] if args.cold else [])]
    procs = [subprocess.Popen([*command, "--index", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
             for i in range(args.processes)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a client did not start: {line!r}")
        reset(base_url)
        started = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        exited = time.time() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    reports = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    if len(reports) != args.processes:
        raise RuntimeError(f"{args.processes - len(reports)} client(s) failed")
    # To the last result: the processes' exit (closing clients, the interpreter's teardown) is not the limit's.
    wall = max(r["finished"] for r in reports) - started
    seen = stats(base_url)
    minimum = max(args.requests / args.rpm, seen["admitted_tokens"] / args.tpm) * 60
    return {
        "setup": setup, "wall_s": wall, "exited_s": exited, "minimum_s": minimum, "efficiency": minimum / wall,
        "rate_limited": seen["rate_limited"], "rate_limited_pct": 100 * seen["rate_limited"] / args.requests,
        "failed": sum(r["failed"] for r in reports),
        "ratios": [round(r["ratio"], 3) for r in reports],
        "timeline": [(second["requests"], second["rate_limited"]) for second in seen["timeline"]],
    }


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server on a free loopback port, no persistence, for the benchmark's life."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH: install it, or pass --redis URL")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(500):
                with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(url) as connection:
                    connection.ping()
                    break
                time.sleep(0.02)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=32, help="workers of each process's pool")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--redis", help="a Redis URL to use (default: start a private redis-server)")
    parser.add_argument("--cold", action="store_true", help="no SDK warm-up call before the start signal")
    parser.add_argument("--timeline", action="store_true", help="print the server's per-second counts")
    # The client processes' arguments.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.redis = args.redis or None
        asyncio.run(child(args))
        return
    setups = [s for s in args.setups.split(",") if s]
    mock_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms),
                 "--latency-sigma", "0.3"]
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    with contextlib.ExitStack() as stack:
        redis_url = args.redis
        if "redis" in setups and redis_url is None:
            redis_url = stack.enter_context(private_redis())
        base_url = stack.enter_context(mock_server(*mock_args))
        print(f"{args.processes} processes, {args.requests} requests, server limits {args.rpm} RPM / "
              f"{args.tpm} TPM, latency {args.latency_ms:g} ms")
        for setup in setups:
            row = run_setup(setup, base_url, redis_url, args)
            print(f"{setup:8s} wall {row['wall_s']:6.2f} s (exited {row['exited_s']:6.2f} s)  "
                  f"minimum {row['minimum_s']:6.2f} s  efficiency {row['efficiency']:.3f}  "
                  f"429s {row['rate_limited']:5d} ({row['rate_limited_pct']:.2f}%)  failed {row['failed']}  "
                  f"token ratios {row['ratios']}",
                  flush=True)
            if args.timeline:
                print("  per second (admitted, 429s):", row["timeline"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
