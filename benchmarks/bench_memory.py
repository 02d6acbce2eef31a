"""Memory of a bulk run: peak RSS of ``scheduler run`` over inputs of growing size; the curve must be flat.

Each size gets a generated Batch API input in a temporary folder (never the repository), a mock server in its
own process with no limits and no latency, and one run of the CLI (``python -m scheduler run INPUT -o OUTPUT
--base-url URL --rpm N --tpm N``) in a child process. Its peak RSS is the kernel's VmHWM of that process; RSS is
also sampled while it runs, to show the curve over time.
``--driver map`` runs ``pool.map`` over the streamed file instead of the CLI (the library alone). ``--tier batch``
runs the CLI on the Batch API tier (``--tier batch``, files of 50,000 requests), the mock's batches answering at
once: planning, the journal, downloads and the hand-out of results are what is measured.

Usage: python benchmarks/bench_memory.py [--sizes 100000,1000000] [--driver cli|map] [--tier standard|batch]
[--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
from common import MODEL, RESULTS, WORDS, machine, mock_server, table, write_json

HIGH_RPM = 100_000_000
HIGH_TPM = 100_000_000_000


def write_input(path: Path, lines: int) -> None:
    """``lines`` Batch API request lines with varied short prompts."""
    with path.open("wb") as out:
        for i in range(lines):
            words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 24))
            out.write(orjson.dumps({
                "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{i} {words}"}], "max_tokens": 16},
            }))
            out.write(b"\n")


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process: its resident memory now and its peak so far."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
        return None  # gone, or a zombie without memory


def measure(command: list[str], env: dict[str, str], rss_limit_mib: float, sample_s: float = 0.1) -> dict[str, Any]:
    """Run ``command``; return its exit code, wall time, peak RSS (MiB) and RSS samples over time.

    The peak is the child's VmHWM, read while it runs (at most ``sample_s`` before its end). Not the
    ``ru_maxrss`` of wait4: Linux carries the parent's peak into a child across fork and exec, so a big parent
    would show as a big child. A child whose RSS passes ``rss_limit_mib`` is killed: a leak must not take a
    shared machine's memory.
    """
    began = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, float]] = []
    peak = [0]
    stop = threading.Event()
    killed: list[float] = []

    def sample() -> None:
        last = -1.0
        while not stop.wait(sample_s):
            memory = _memory_kib(proc.pid)
            if memory is None:
                continue
            rss, hwm = memory
            peak[0] = max(peak[0], hwm)
            now = time.perf_counter() - began
            if now - last >= 0.5:  # the curve needs no more than two points a second
                samples.append((round(now, 1), round(rss / 1024, 1)))
                last = now
            if rss / 1024 > rss_limit_mib and not killed:
                killed.append(rss / 1024)
                proc.kill()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stderr is not None
    with proc.stderr:
        stderr = proc.stderr.read()  # drained as it comes, so a chatty child never blocks on a full pipe
    proc.wait()
    stop.set()
    sampler.join()
    return {"exit_code": proc.returncode, "wall_s": round(time.perf_counter() - began, 2),
            "peak_rss_mib": round(peak[0] / 1024, 1), "killed_over_limit": bool(killed), "samples": samples,
            "stderr_tail": stderr.decode(errors="replace")[-2000:]}


def cli_available() -> bool:
    probe = subprocess.run([sys.executable, "-m", "scheduler", "run", "--help"], capture_output=True)
    return probe.returncode == 0


def run_size(lines: int, driver: str, folder: Path, rss_limit_mib: float, tier: str = "standard"
             ) -> dict[str, Any]:
    source, output = folder / f"input-{lines}.jsonl", folder / f"output-{lines}.jsonl"
    write_input(source, lines)
    output.unlink(missing_ok=True)
    env = {**os.environ, "OPENAI_API_KEY": "mock"}
    batches = ("--batch-step-s", "0.1", "--batch-lines-per-s", "10000000")
    with mock_server("--rpm", "none", "--tpm", "none", *batches) as base_url:
        if driver == "cli":
            command = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output),
                       "--base-url", base_url, "--rpm", str(HIGH_RPM), "--tpm", str(HIGH_TPM), "--tier", tier]
            if tier == "batch":
                command += ["--poll-interval", "0.5"]
        else:
            command = [sys.executable, __file__, "--inner-map", str(source), str(output), base_url]
        figures = measure(command, env, rss_limit_mib)
    written = sum(1 for _ in output.open("rb")) if output.exists() else 0
    source.unlink()
    output.unlink(missing_ok=True)
    return {"driver": driver if tier == "standard" else f"{driver} --tier {tier}", "lines": lines, "written": written,
            "req_per_s": round(written / figures["wall_s"]) if figures["wall_s"] else None, **figures}


def run(sizes: list[int], driver: str | None = None, rss_limit_mib: float = 4096, tier: str = "standard"
        ) -> dict[str, Any]:
    """Every size, smallest first; returns the figures."""
    driver = driver or ("cli" if cli_available() else "map")
    where = machine()  # before the runs: the code they load is the code of this moment
    rows = []
    with tempfile.TemporaryDirectory(prefix="scheduler-bench-memory-") as folder:
        for lines in sizes:
            rows.append(run_size(lines, driver, Path(folder), rss_limit_mib, tier))
            print(table(rows[-1:], COLUMNS), flush=True)
            if rows[-1]["exit_code"] != 0:
                print(rows[-1]["stderr_tail"], file=sys.stderr)
    return {"driver": driver, "machine": where, "rows": rows}


COLUMNS = ("driver", "lines", "written", "exit_code", "wall_s", "req_per_s", "peak_rss_mib", "killed_over_limit")


# ------------------------------------------------------------------ the map driver (runs in the child process)


async def _map_run(source: Path, output: Path, base_url: str) -> None:
    import logging

    import openai
    from common import quiet_logs

    import scheduler

    quiet_logs(logging.WARNING)

    async def requests() -> AsyncIterator[scheduler.Request]:
        for raw in _lines(source):
            line = orjson.loads(raw)
            yield scheduler.Request(line["body"], endpoint=line["url"], custom_id=line["custom_id"])

    client = openai.AsyncOpenAI(base_url=base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
    limits = scheduler.Limits(rpm=HIGH_RPM, tpm=HIGH_TPM)
    # The sink writes every result: map()'s own stream is drained without keeping anything.
    sink = scheduler.JsonlSink(output)
    async with client, scheduler.Pool(client=client, model=MODEL, limits=limits, sink=sink) as pool:
        async for _ in pool.map(requests()):
            pass


def _lines(source: Path) -> Iterator[bytes]:
    with source.open("rb") as file:
        yield from file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="input lines, comma-separated")
    parser.add_argument("--driver", choices=("cli", "map"), help="default: the CLI if it is installed")
    parser.add_argument("--tier", choices=("standard", "batch"), default="standard",
                        help="the CLI's tier (batch: the Batch API, the mock's batches answering at once)")
    parser.add_argument("--rss-limit-mib", type=float, default=4096, help="kill a run whose RSS passes this")
    parser.add_argument("--json", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--inner-map", nargs=3, metavar=("INPUT", "OUTPUT", "BASE_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_map:
        source, output, base_url = args.inner_map
        asyncio.run(_map_run(Path(source), Path(output), base_url))
        return
    out = run([int(size) for size in args.sizes.split(",") if size], args.driver, args.rss_limit_mib, args.tier)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
