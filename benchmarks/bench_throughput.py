"""Real-client throughput: requests per second through the openai SDK to the mock on loopback, limits far above.

The mock runs in its own process with no latency; the client keeps 64 requests in flight. Compared, in the
same run: the scheduler on the SDK's default transport (httpx2) and on ``openai.DefaultAioHttpClient()``, and,
for reference, the SDK alone (``chat.completions.create`` behind a semaphore, which also builds pydantic
models). CPU per request is the client process's user+system time (``resource.getrusage``) over the requests;
the mock's CPU time is shown too, to tell whether the server was the bottleneck.

Usage: python benchmarks/bench_throughput.py [--requests 3000] [--concurrency 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import MODEL, RESULTS, mock_process, prompts, quiet_logs, table, write_json

import scheduler

#: the configurations, in the order they run
CONFIGS = ("scheduler/httpx2", "scheduler/aiohttp", "sdk-alone/httpx2", "sdk-alone/aiohttp")


def _client(base_url: str, transport: str) -> Any:
    import openai

    http_client = openai.DefaultAioHttpClient() if transport == "aiohttp" else None
    return openai.AsyncOpenAI(base_url=base_url, api_key="mock", max_retries=0, http_client=http_client)


async def run_config(name: str, base_url: str, texts: list[str], concurrency: int, warm_up: int) -> dict[str, Any]:
    """Send every text once through ``name``'s client; time it and read this process's CPU time."""
    who, transport = name.split("/")
    client = _client(base_url, transport)
    async with client:
        if who == "scheduler":
            limits = scheduler.Limits(rpm=10**9, tpm=10**12)
            async with scheduler.Pool(client=client, model=MODEL, limits=limits, workers=concurrency) as pool:

                async def send_all(batch: list[str]) -> int:
                    results = await asyncio.gather(*(pool.submit(t, max_tokens=16, raise_errors=False) for t in batch))
                    return sum(r.ok for r in results)

                return await _measure(name, send_all, texts, warm_up)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(text: str) -> bool:
            async with semaphore:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=16
                )
                return True

        async def send_direct(batch: list[str]) -> int:
            outcomes = await asyncio.gather(*(one(t) for t in batch), return_exceptions=True)
            return sum(o is True for o in outcomes)

        return await _measure(name, send_direct, texts, warm_up)


async def _measure(
    name: str, send: Callable[[list[str]], Awaitable[int]], texts: list[str], warm_up: int
) -> dict[str, Any]:
    await send(texts[:warm_up])  # connections opened, caches warm: steady state is what is measured
    measured = texts[warm_up:]
    before, began = _cpu(), time.perf_counter()
    ok = await send(measured)
    wall, cpu = time.perf_counter() - began, _cpu() - before
    return {"config": name, "requests": len(measured), "ok": ok, "wall_s": round(wall, 3),
            "req_per_s": round(len(measured) / wall), "cpu_ms_per_req": round(1000 * cpu / len(measured), 3),
            "cpu_cores": round(cpu / wall, 2)}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu(pid: int) -> float:
    """User+system CPU seconds of another process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(requests: int = 3000, concurrency: int = 64, configs: tuple[str, ...] = CONFIGS) -> dict[str, Any]:
    """Every configuration against one mock server; returns the figures."""
    quiet_logs(logging.WARNING)
    warm_up = min(500, requests // 5)
    texts = prompts(requests + warm_up, seed=5, words=(10, 30))
    rows = []
    with mock_process("--rpm", "none", "--tpm", "none") as (base_url, proc):
        for name in configs:
            server_before = _proc_cpu(proc.pid)
            row = asyncio.run(run_config(name, base_url, texts, concurrency, warm_up))
            # The mock's CPU over this configuration's requests, warm-up included.
            row["mock_cpu_ms_per_req"] = round(1000 * (_proc_cpu(proc.pid) - server_before) / (requests + warm_up), 3)
            rows.append(row)
            print(table(rows[-1:], COLUMNS), flush=True)
    return {"concurrency": concurrency, "rows": rows}


COLUMNS = ("config", "requests", "ok", "wall_s", "req_per_s", "cpu_ms_per_req", "cpu_cores", "mock_cpu_ms_per_req")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"some of {','.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, default=RESULTS / "throughput.json")
    args = parser.parse_args()
    configs = tuple(c for c in args.configs.split(",") if c)
    if set(configs) - set(CONFIGS):
        parser.error(f"unknown config; choose from {', '.join(CONFIGS)}")
    out = run(args.requests, args.concurrency, configs)
    print()
    print(table(out["rows"], COLUMNS))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
