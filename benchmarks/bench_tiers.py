"""Cost tiers: one workload run on standard, flex, batch and auto, with the cost at each tier's prices and the time.

The mock server runs in its own process: online limits like OpenAI's (RPM/TPM with one-second quantization),
latency lognormal around 200 ms, flex answered more slowly and short of capacity part of the time
(``--flex-capacity``: a flex request finds none with probability 1 - P and gets 429 ``resource_unavailable``), and
its Batch API accelerated (each batch answers ``--batch-lines-per-s`` lines a second: a batch of 500 takes a
minute instead of up to 24 hours). Each tier runs the same input (chat completions on gpt-5-mini, a model offered
on flex) with ``scheduler run IN -o OUT --base-url ... --rpm ... --tpm ... --tier T`` in a subprocess:

- ``standard``, ``flex``: online; flex retries its capacity 429s after a backoff (no pause, no slow-down);
- ``batch``: the Batch API in files of ``--batch-size`` requests;
- ``auto``: ``--deadline`` chosen so that the batches cannot finish in time: the run cuts over to online (flex)
  when the deadline less the time the rest takes online comes;
- ``batch-kill9``: the batch tier killed with SIGKILL while it polls, then run again: the batches it created are
  counted on the mock (by their metadata), so a batch submitted twice would show; so would a line written twice.

Cost is what the run's summary reports (each result priced at its tier: batch and flex at half the standard
price), with what the same answers cost at standard prices; time is the process's wall time, start-up included.

Run: ``python benchmarks/bench_tiers.py [--requests 2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from common import RESULTS, machine, mock_server, stats, table, write_chats, write_json

MODEL = "gpt-5-mini"


def command(source: Path, output: Path, base_url: str, args: argparse.Namespace, tier: str) -> list[str]:
    cmd = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output), "--base-url", base_url,
           "--rpm", str(args.rpm), "--tpm", str(args.tpm), "--workers", str(args.workers), "--tier", tier]
    if tier in ("batch", "auto"):
        cmd += ["--batch-size", str(args.batch_size), "--poll-interval", "0.5"]
    if tier == "auto":
        cmd += ["--deadline", f"{args.deadline_s:g}s"]
    return cmd


def summary_of(stderr: str) -> dict[str, Any]:
    return next(json.loads(line) for line in stderr.splitlines() if '"run_summary"' in line)


def batches_of(base_url: str, output: Path) -> int:
    """Batches the mock holds for the run that wrote ``output`` (its journal names the run)."""
    import openai

    state = output.with_name(output.name + ".batches")
    if not state.exists():
        return 0
    run_id = orjson.loads(state.read_bytes().splitlines()[0])["run"]
    with openai.OpenAI(base_url=base_url, api_key="mock-key") as client:
        return sum(1 for batch in client.batches.list(limit=100)
                   if (batch.metadata or {}).get("scheduler_run") == run_id)


def output_figures(output: Path) -> dict[str, Any]:
    records = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    ids = Counter(r["custom_id"] for r in records)
    tiers = Counter(r["scheduler"].get("tier") for r in records if r["error"] is None)
    return {"lines": len(records), "duplicate_lines": sum(n - 1 for n in ids.values()),
            "served": ", ".join(f"{tier} {n}" for tier, n in sorted(tiers.items()))}


def run_tier(source: Path, folder: Path, base_url: str, args: argparse.Namespace, tier: str) -> dict[str, Any]:
    output = folder / f"out-{tier}.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "mock-key"}
    before = stats(base_url)
    started = time.monotonic()
    killed_after = None
    if tier == "batch-kill9":
        proc = subprocess.Popen(command(source, output, base_url, args, "batch"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(args.kill_after_s)  # every batch created and running: the process only polls
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_after = round(time.monotonic() - started, 1)
    cmd = command(source, output, base_url, args, "batch" if tier == "batch-kill9" else tier)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - started
    summary = summary_of(done.stderr)
    after = stats(base_url)
    cost, standard = summary["cost_usd"], summary.get("standard_cost_usd", summary["cost_usd"])
    row = {
        "tier": tier, "wall_s": round(wall, 1), "cost_usd": f"${cost:.4f}", "standard_usd": f"${standard:.4f}",
        "vs_standard": f"{cost / standard - 1:+.0%}" if standard else None,
        **output_figures(output),
        "online_requests": after["requests"] - before["requests"],
        "rate_429s": after["rate_limited"] - before["rate_limited"],
        "capacity_429s": after["flex"]["unavailable"] - before["flex"]["unavailable"],
        "batches_created": batches_of(base_url, output),
        "failed": summary["failed"], "exit": done.returncode,
    }
    if killed_after is not None:
        row["killed_after_s"] = killed_after
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tiers", default="standard,flex,batch,auto,batch-kill9")
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--flex-capacity", type=float, default=0.7)
    parser.add_argument("--flex-latency-ms", type=float, default=300.0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-lines-per-s", type=float, default=10.0)
    parser.add_argument("--deadline-s", type=float, default=45.0, help="auto: the deadline from the run's start")
    parser.add_argument("--kill-after-s", type=float, default=15.0, help="batch-kill9: when the first run dies")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "tiers.json")
    args = parser.parse_args()
    mock_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms),
                 "--latency-sigma", "0.3", "--flex-capacity", str(args.flex_capacity), "--flex-latency-ms",
                 str(args.flex_latency_ms), "--batch-step-s", "1", "--batch-lines-per-s", str(args.batch_lines_per_s)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, mock_server(*mock_args) as base_url:
        folder = Path(tmp)
        source = folder / "in.jsonl"
        write_chats(source, args.requests, args.max_tokens, MODEL)
        for tier in args.tiers.split(","):
            row = run_tier(source, folder, base_url, args, tier)
            rows.append(row)
            print(table([row], list(row)), flush=True)
    columns = ["tier", "wall_s", "cost_usd", "vs_standard", "served", "online_requests", "rate_429s",
               "capacity_429s", "batches_created", "duplicate_lines", "failed"]
    print()
    print(table(rows, columns))
    write_json(args.json, {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "rows": rows})


if __name__ == "__main__":
    main()
