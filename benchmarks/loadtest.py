"""Load test any OpenAI-compatible server (vLLM, the mock, a gateway): throughput, latency percentiles, errors.

Open loop (``--rate R``): requests arrive as a Poisson process at R per second, whether or not earlier ones have
answered, as independent users would; this is how to find the rate a server sustains. Closed loop
(``--concurrency C``): C clients each send their next request when the last one answers. The run lasts
``--duration`` seconds or ``--requests`` requests. It uses the openai SDK directly with ``max_retries=0``, so it
measures the server, not anyone's retries; nothing here goes through the scheduler.

Examples:
    python benchmarks/loadtest.py --base-url http://127.0.0.1:8000/v1 --model my-model --rate 20 --duration 60
    python benchmarks/loadtest.py --mock --concurrency 32 --requests 2000 --stream --json results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import WORDS, mock_server, percentile, table, write_json


@dataclass(slots=True)
class Tally:
    """What came back: latencies of successes, time to first token of streams, errors by kind."""

    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    sent: int = 0
    #: open loop only: arrivals not sent because --max-in-flight requests were already waiting
    shed: int = 0
    #: seconds from the start to the last request sent
    sending_s: float = 0.0


def error_kind(exc: BaseException) -> str:
    """A short, stable name for a failure: ``HTTP 429``, ``timeout``, ``connection``..."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


class Sender:
    """Sends one request at a time into a shared :class:`Tally`."""

    def __init__(self, client: Any, args: argparse.Namespace, tally: Tally) -> None:
        self.client = client
        self.args = args
        self.tally = tally
        self._rng = random.Random(args.seed)

    def _messages(self) -> list[dict[str, str]]:
        if self.args.prompt:
            return [{"role": "user", "content": self.args.prompt}]
        words = " ".join(self._rng.choice(WORDS) for _ in range(self.args.prompt_words))
        return [{"role": "user", "content": words}]

    async def one(self) -> None:
        args, tally = self.args, self.tally
        tally.sent += 1
        began = time.perf_counter()
        try:
            if args.stream:
                await self._stream(began)
            else:
                response = await self.client.chat.completions.create(
                    model=args.model, messages=self._messages(), max_tokens=args.max_tokens
                )
                if response.usage is not None:
                    tally.prompt_tokens += response.usage.prompt_tokens
                    tally.completion_tokens += response.usage.completion_tokens
        except Exception as exc:  # every failure is a figure here, not a crash
            tally.errors[error_kind(exc)] += 1
            return
        tally.latencies.append(time.perf_counter() - began)

    async def _stream(self, began: float) -> None:
        args, tally = self.args, self.tally
        stream = await self.client.chat.completions.create(
            model=args.model, messages=self._messages(), max_tokens=args.max_tokens, stream=True,
            stream_options={"include_usage": True},
        )
        first = True
        async for chunk in stream:
            if first and chunk.choices and chunk.choices[0].delta.content:
                tally.first_token.append(time.perf_counter() - began)
                first = False
            if chunk.usage is not None:
                tally.prompt_tokens += chunk.usage.prompt_tokens
                tally.completion_tokens += chunk.usage.completion_tokens


def _budget(args: argparse.Namespace) -> Iterator[int]:
    """Request numbers until the count is reached (endless with only a duration)."""
    count = 0
    while args.requests is None or count < args.requests:
        yield count
        count += 1


async def open_loop(sender: Sender, args: argparse.Namespace, deadline: float) -> None:
    """Poisson arrivals at ``--rate``: exponential gaps, each arrival its own task."""
    rng = random.Random(args.seed + 1)
    in_flight: set[asyncio.Task[None]] = set()
    began = next_at = time.perf_counter()
    for _ in _budget(args):
        next_at += rng.expovariate(args.rate)
        if next_at >= deadline:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if len(in_flight) >= args.max_in_flight:
            sender.tally.shed += 1  # the client is the bottleneck now: say so rather than hide it
            continue
        task = asyncio.ensure_future(sender.one())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    sender.tally.sending_s = time.perf_counter() - began
    if in_flight:
        await asyncio.wait(in_flight)


async def closed_loop(sender: Sender, args: argparse.Namespace, deadline: float) -> None:
    """``--concurrency`` clients, each sending its next request when the last one answers."""
    budget = _budget(args)

    async def client() -> None:
        for _ in budget:  # shared: together the clients send --requests
            if time.perf_counter() >= deadline:
                return
            await sender.one()

    await asyncio.gather(*(client() for _ in range(args.concurrency)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    http_client = openai.DefaultAioHttpClient() if args.http == "aiohttp" else None
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                timeout=args.timeout, http_client=http_client)
    tally = Tally()
    sender = Sender(client, args, tally)
    async with client:
        began = time.perf_counter()
        deadline = began + args.duration if args.duration else float("inf")
        if args.rate:
            await open_loop(sender, args, deadline)
        else:
            await closed_loop(sender, args, deadline)
        wall = time.perf_counter() - began
    return summary(args, tally, wall)


def summary(args: argparse.Namespace, tally: Tally, wall: float) -> dict[str, Any]:
    ok = len(tally.latencies)
    offered = (tally.sent + tally.shed) / tally.sending_s if args.rate and tally.sending_s else None
    out: dict[str, Any] = {
        "mode": f"open loop, {args.rate:g}/s Poisson" if args.rate else f"closed loop, {args.concurrency} clients",
        "stream": args.stream,
        "model": args.model,
        "wall_s": round(wall, 3),
        "sent": tally.sent,
        "ok": ok,
        "errors": sum(tally.errors.values()),
        "errors_by_kind": dict(tally.errors),
        "shed_arrivals": tally.shed,
        "offered_req_s": round(offered, 2) if offered is not None else None,
        "throughput_req_s": round(ok / wall, 2) if wall else 0.0,
        "output_tokens_s": round(tally.completion_tokens / wall, 1) if wall else 0.0,
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
    }
    for name, values in (("latency", tally.latencies), ("ttft", tally.first_token)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}_ms"] = round(1000 * percentile(values, q), 1) if values else None
    return out


def report(out: dict[str, Any]) -> str:
    rows = [{"figure": key, "value": value} for key, value in out.items()
            if key != "errors_by_kind" and value is not None]
    rows += [{"figure": f"errors: {kind}", "value": count} for kind, count in sorted(out["errors_by_kind"].items())]
    return table(rows, ("figure", "value"))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc[doc.index("Examples"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--mock", action="store_true", help="start the built-in mock server (no limits) and test it")
    parser.add_argument("--mock-latency-ms", type=float, default=0.0, help="with --mock: its median latency")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"),
                        help="default: $OPENAI_API_KEY")
    parser.add_argument("--model", default="gpt-4o-mini")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, help="closed loop: this many clients, one request each at a time")
    parser.add_argument("--duration", type=float, help="seconds to send for (default 10 without --requests)")
    parser.add_argument("--requests", type=int, help="requests to send")
    parser.add_argument("--stream", action="store_true", help="stream the answers (measures time to first token)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", help="the prompt of every request (default: random words)")
    parser.add_argument("--prompt-words", type=int, default=50, help="words of a random prompt")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as timed out")
    parser.add_argument("--max-in-flight", type=int, default=10_000, help="open loop: most requests outstanding")
    parser.add_argument("--http", choices=("aiohttp", "httpx2"), default="aiohttp",
                        help="the SDK's HTTP client (aiohttp spends less client CPU per request)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.duration is None and args.requests is None:
        args.duration = 10.0
    for name in ("rate", "concurrency", "duration", "requests"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    with contextlib.ExitStack() as stack:
        if args.mock:
            mock = ("--rpm", "none", "--tpm", "none", "--latency-ms", str(args.mock_latency_ms))
            args.base_url = stack.enter_context(mock_server(*mock))
        out = asyncio.run(run(args))
    print(report(out))
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
