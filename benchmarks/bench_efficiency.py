"""Limit efficiency: how close a bulk workload gets to the theoretical minimum time under RPM/TPM limits.

A mock server in its own process enforces the limits like OpenAI (one-second quantization, 429s with
retry-after); the client sends N chat completions at once through the real openai SDK. The theoretical minimum
is ``max(N / RPM, server-counted tokens / TPM)`` minutes; efficiency is that over the wall time.

Usage: python benchmarks/bench_efficiency.py [--requests 2000] [--rpm 6000] [--tpm 600000] [--latency-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from common import mock_server, prompts, reset, stats

import scheduler


async def run_scheduler(base_url: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
    limits = scheduler.Limits(rpm=args.rpm, tpm=args.tpm)
    pool = scheduler.Pool(client=client, model="gpt-4o-mini", limits=limits, workers=args.workers)
    async with client, pool:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(pool.submit(text, max_tokens=args.max_tokens, raise_errors=False) for text in texts)
        )
        wall = time.perf_counter() - started
        ratio = pool.statistics().token_ratio
    return {"wall_s": wall, "failed": sum(not r.ok for r in results), "token_ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--timeline", action="store_true", help="print the server's per-second counts")
    args = parser.parse_args()
    texts = prompts(args.requests)
    mock_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms),
                 "--latency-sigma", "0.3"]
    with mock_server(*mock_args) as base_url:
        reset(base_url)
        outcome = asyncio.run(run_scheduler(base_url, texts, args))
        seen = stats(base_url)
    if args.timeline:
        for second in seen["timeline"]:
            print(second)
    tokens = seen["admitted_tokens"]
    minimum = max(args.requests / args.rpm, tokens / args.tpm) * 60
    print(f"requests {args.requests}  server tokens {tokens}  theoretical minimum {minimum:.2f} s")
    print(f"wall {outcome['wall_s']:.2f} s  efficiency {minimum / outcome['wall_s']:.3f}  "
          f"429s {seen['rate_limited']} ({100 * seen['rate_limited'] / args.requests:.2f}%)  "
          f"failed {outcome['failed']}  learned token ratio {outcome['token_ratio']:.3f}")


if __name__ == "__main__":
    main()
