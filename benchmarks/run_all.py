"""Run the benchmark suite in one command and print one table: each figure the benchmarks measure, beside its
target (the targets are listed in benchmarks/README.md), and whether it is met.

Steps: efficiency (bulk runs under RPM/TPM limits: the scheduler against a naive client and an aiolimiter client,
with and without injected faults), overhead (jobs per second through the pool with an in-process transport),
throughput (requests per second through the real openai SDK to the mock server) and memory (peak RSS of
``scheduler run``, here at 10,000 and 40,000 lines; the 1,000,000-line figure takes over half an hour:
``python benchmarks/bench_memory.py --sizes 100000,1000000``).

Everything runs on loopback against the built-in mock server. The figures go to benchmarks/results/summary.json,
and the efficiency step's plot to benchmarks/results/efficiency.png.

Examples:
  python benchmarks/run_all.py
  python benchmarks/run_all.py --only overhead,throughput
  python benchmarks/run_all.py --only memory --memory-sizes 10000,100000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

# Run as a script, this folder is first on sys.path: the benchmarks import each other by module name.
import bench_efficiency
import bench_memory
import bench_overhead
import bench_throughput
from common import RESULTS, machine, table, write_json

STEPS = ("efficiency", "overhead", "throughput", "memory")


def efficiency(_: argparse.Namespace) -> list[dict[str, Any]]:
    return bench_efficiency.run(list(bench_efficiency.VARIANTS), list(bench_efficiency.CLIENTS),
                                bench_efficiency.Workload(), variant_requests=1000)


def overhead(_: argparse.Namespace) -> dict[str, Any]:
    out = bench_overhead.run()
    print(bench_overhead.report(out), flush=True)
    return out


def throughput(_: argparse.Namespace) -> dict[str, Any]:
    return bench_throughput.run()


def memory(args: argparse.Namespace) -> dict[str, Any]:
    return bench_memory.run([int(size) for size in args.memory_sizes.split(",")])


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: what was measured, the target, and whether it is met."""
    rows: list[dict[str, Any]] = []

    def add(figure: str, measured: str, target: str, met: bool | None) -> None:
        rows.append({"figure": figure, "measured": measured, "target": target,
                     "met": None if met is None else ("yes" if met else "NO")})

    for variant in results.get("efficiency", []):
        by_client = {row["client"]: row for row in variant["rows"]}
        ours = by_client.get("scheduler")
        if ours is None:
            continue
        ok = ours["failed"] == 0 and ours["efficiency"] is not None
        add(f"limit efficiency ({variant['variant']}, {ours['requests']:,} req)",
            f"{ours['efficiency'] or 0:.3f}, 429s {ours['429_pct']:.2f}%, {ours['retries']} retries, "
            f"{ours['failed']} failed",
            ">= 0.95, 429s < 0.5%", ok and ours["efficiency"] >= 0.95 and ours["429_pct"] < 0.5)
        for peer in ("naive", "aiolimiter"):
            other = by_client.get(peer)
            if other is None:
                continue
            # "Faster" means all the work done sooner: a client that gave up on requests never finished it.
            sooner = ours["failed"] == 0 and (other["failed"] > 0 or other["wall_s"] > ours["wall_s"])
            fewer_429s = other["429s"] >= 10 * max(ours["429s"], 1)
            add(f"  vs {peer} ({variant['variant']})",
                f"{other['wall_s']:.1f} s vs ours {ours['wall_s']:.1f} s; 429s {other['429s']:,} vs {ours['429s']:,}; "
                f"failed {other['failed']:,} vs {ours['failed']:,}",
                "all done sooner, far fewer 429s", sooner and fewer_429s)
    if "overhead" in results:
        for run in results["overhead"]["runs"]:
            lost = f", {run['jobs'] - run['yielded']:,} results not yielded" if run["yielded"] != run["jobs"] else ""
            add(f"overhead ({run['mode']})",
                f"{run['jobs_per_s']:,} jobs/s; {run['cpu_us_per_job']} us CPU/job = {run['jobs_per_cpu_s']:,} "
                f"jobs per CPU-second{lost}",
                ">= 20,000 jobs/s on one core", run["jobs_per_cpu_s"] >= 20_000 and not lost)
        for row in results["overhead"]["estimates"]:
            add(f"token estimate, {row['prompt']}", f"{row['tiktoken_us']} us; cache hit {row['cache_hit_us']} us",
                "(measured)", None)
    if "throughput" in results:
        for row in results["throughput"]["rows"]:
            target = row["config"].startswith("scheduler")
            add(f"throughput {row['config']}", f"{row['req_per_s']:,} req/s, {row['cpu_ms_per_req']} ms CPU/req",
                ">= 500 req/s" if target else "(reference)", row["req_per_s"] >= 500 if target else None)
    if "memory" in results:
        peaks = [row["peak_rss_mib"] for row in results["memory"]["rows"]]
        for row in results["memory"]["rows"]:
            add(f"memory, {row['lines']:,} lines ({results['memory']['driver']})",
                f"peak RSS {row['peak_rss_mib']:.0f} MiB, {row['written']:,} written",
                "< 300 MB", row["peak_rss_mib"] < 300 and row["written"] == row["lines"])
        if len(peaks) > 1:
            growth = peaks[-1] - peaks[0]
            add("memory curve", f"{growth:+.0f} MiB from smallest to largest", "flat (within ~10%)",
                abs(growth) <= 0.1 * peaks[0])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(STEPS), metavar="STEPS",
                        help=f"the steps to run, comma-separated (default: all of {','.join(STEPS)})")
    parser.add_argument("--memory-sizes", default="10000,40000", metavar="LINES",
                        help="input sizes of the memory step, comma-separated (default: 10000,40000)")
    args = parser.parse_args()
    steps: dict[str, Callable[[argparse.Namespace], Any]] = {
        "efficiency": efficiency, "overhead": overhead, "throughput": throughput, "memory": memory,
    }
    chosen = [step for step in args.only.split(",") if step]
    if set(chosen) - set(steps):
        parser.error(f"choose from {', '.join(STEPS)}")
    results: dict[str, Any] = {"machine": machine()}
    timings = {}
    suite_began = time.time()
    for step in chosen:
        print(f"\n=== {step}", flush=True)
        began = time.perf_counter()
        results[step] = steps[step](args)
        timings[step] = round(time.perf_counter() - began, 1)
    results["seconds"] = timings
    results["summary"] = summarize(results)
    write_json(RESULTS / "summary.json", results)
    print(f"\n=== summary ({results['machine']['date']}, {results['machine']['cores']} cores, "
          f"Python {results['machine']['python']}; seconds per step: {timings})")
    print(table(results["summary"], ("figure", "measured", "target", "met")))
    plot = RESULTS / "efficiency.png"
    written = plot.exists() and plot.stat().st_mtime >= suite_began  # not an old plot from an earlier run
    print(f"\nfigures: {RESULTS / 'summary.json'}" + (f"; plot: {plot}" if written else ""))


if __name__ == "__main__":
    main()
