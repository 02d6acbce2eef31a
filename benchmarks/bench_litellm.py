"""A gateway we did not write: ``scheduler run`` against LiteLLM's proxy, and the facts of its rate-limit dialect.

LiteLLM's proxy runs from its own virtual environment (``bash benchmarks/litellm/setup.sh``; LiteLLM is no
dependency of the project) with ``benchmarks/litellm/config.yaml``: one mock deployment (``mock_response``, no
upstream) limited to 600 RPM / 100,000 TPM. The proxy counts requests and tokens per calendar minute (UTC), tokens
from each response's ``usage``, and reports them in ``x-ratelimit-*`` headers without reset headers.

Each run writes N chat requests (``max_tokens`` 50, prompts of 20-60 words), waits for the next calendar minute
plus ``--align-s`` (a fresh window, so runs start alike), and runs the CLI as users run it::

    scheduler run IN -o OUT --base-url http://127.0.0.1:PORT/v1 --rpm 600 --tpm 100000    (mode rpm+tpm)
    scheduler run IN -o OUT --base-url http://127.0.0.1:PORT/v1 --rpm 600                 (mode rpm)

The limits given are the proxy's own (read from its headers at start-up). The theoretical minimum is
``max(N / RPM, tokens / TPM)`` minutes, tokens being what the proxy counted (the ``usage`` of the answers); wall
time is that of the CLI's process. 429s and requests received are the proxy's counts (its access log).
``--windows spent`` has another client spend the minute's requests just before the run starts (the run meets a
spent window, as when a gateway is shared); its minimum adds the seconds left until the minute turns.

``--probe`` instead sends requests by hand, through the ``openai`` SDK (``max_retries=0``) and raw HTTP, and
prints verbatim captures of successes and 429s (RPM and TPM), the window turning at the minute, and what the
token count is made of, as Markdown (``benchmarks/litellm/observed.md`` was made so).

Usage: python benchmarks/bench_litellm.py [--requests 500] [--runs 1] [--modes rpm+tpm,rpm,none]
           [--windows fresh,spent] [--litellm-python PATH] [--config PATH] [--align-s 2 | --no-align] [--json PATH]
       python benchmarks/bench_litellm.py --probe [--litellm-python PATH]
The proxy's Python: ``--litellm-python``, else ``$LITELLM_PYTHON``, else ``benchmarks/litellm/.venv/bin/python``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from common import HERE, MODEL, RESULTS, chat_line, free_port, machine, prompts, table, write_json

LITELLM = HERE / "litellm"
DEFAULT_PYTHON = LITELLM / ".venv" / "bin" / "python"
DEFAULT_CONFIG = LITELLM / "config.yaml"
#: keep the proxy off the network: it fetches a model cost map and other tables at start-up unless told not to
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "NO_DOCS": "True",
}
MODES = {"rpm+tpm": ("rpm", "tpm"), "rpm": ("rpm",), "none": ()}
ACCESS_LOG = re.compile(rb'"POST /v1/chat/completions HTTP/1\.1" (\d{3})')
MAX_TOKENS = 50
START_TIMEOUT_S = 180.0


class SetupError(Exception):
    """The proxy's environment is missing or the proxy does not start; the message says what to do."""


def proxy_python(given: str | None) -> Path:
    """The Python of LiteLLM's environment; :class:`SetupError` saying how to create it when it is missing."""
    path = Path(given or os.environ.get("LITELLM_PYTHON") or DEFAULT_PYTHON)
    if not path.is_file():
        raise SetupError(f"no Python for LiteLLM's proxy at {path}. Create its environment with\n"
                         f"    bash benchmarks/litellm/setup.sh\n"
                         "or point --litellm-python (or LITELLM_PYTHON) at a Python that has litellm[proxy].")
    probe = subprocess.run([str(path), "-c", "import litellm.proxy.proxy_cli"], capture_output=True, timeout=120,
                           env={**os.environ, **OFFLINE_ENV})
    if probe.returncode != 0:
        raise SetupError(f"{path} cannot import litellm.proxy.proxy_cli (is litellm[proxy] installed there?). "
                         "Run: bash benchmarks/litellm/setup.sh")
    return path


def config_text(config: Path, rpm: int | None = None, tpm: int | None = None) -> str:
    """The proxy config, with the deployment's ``rpm``/``tpm`` replaced when given."""
    text = config.read_text()
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            text, count = re.subn(rf"(?m)^(\s+{name}:)[ \t]*\d+[ \t]*$", rf"\g<1> {value}", text)
            if count == 0:
                raise SetupError(f"{config}: no '{name}:' line to set")
    return text


def master_key(text: str) -> str:
    found = re.search(r"(?m)^\s*master_key:\s*(\S+)", text)
    if found is None:
        raise SetupError("the proxy config has no general_settings.master_key")
    return found.group(1)


@dataclass(slots=True)
class Proxy:
    """A running LiteLLM proxy: its base URL, its key, and its log (the access log counts its answers)."""

    base_url: str
    key: str
    log: Path

    def log_size(self) -> int:
        return self.log.stat().st_size

    def statuses(self, since: int = 0) -> collections.Counter[int]:
        """Status codes of the chat completions it answered since log offset ``since``."""
        with self.log.open("rb") as file:
            file.seek(since)
            return collections.Counter(int(code) for code in ACCESS_LOG.findall(file.read()))


@contextlib.contextmanager
def litellm_proxy(python: Path, config: str, folder: Path) -> Iterator[Proxy]:
    """Run LiteLLM's proxy with ``config`` (its text) on a free loopback port until the block ends."""
    port = free_port()
    path = folder / f"litellm-{port}.yaml"
    path.write_text(config)
    log = folder / f"litellm-{port}.log"
    command = [str(python), "-m", "litellm.proxy.proxy_cli", "--config", str(path), "--host", "127.0.0.1",
               "--port", str(port)]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _alive(root):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_bytes()[-3000:].decode(errors="replace")
                raise SetupError(f"LiteLLM's proxy did not start (exit code {proc.poll()}); its log ends:\n{tail}")
            time.sleep(0.5)
        yield Proxy(f"{root}/v1", master_key(config), log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def _alive(root: str) -> bool:
    try:
        with urllib.request.urlopen(f"{root}/health/liveliness", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def post(proxy: Proxy, content: str, max_tokens: int = MAX_TOKENS) -> tuple[int, list[tuple[str, str]], bytes]:
    """One chat completion by raw HTTP: status, headers (in order, as sent), body."""
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens})
    request = urllib.request.Request(f"{proxy.base_url}/chat/completions", data=body, method="POST", headers={
        "Authorization": f"Bearer {proxy.key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, list(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, list(error.headers.items()), error.read()


def limits_of(proxy: Proxy) -> tuple[int, int]:
    """The proxy's (RPM, TPM), from a request's ``x-ratelimit-limit-*`` headers (it also warms the proxy up)."""
    status, headers, body = post(proxy, "Say hello.")
    found = {name.lower(): value for name, value in headers}
    if status != 200 or "x-ratelimit-limit-requests" not in found or "x-ratelimit-limit-tokens" not in found:
        raise SetupError(f"the proxy's first answer has no x-ratelimit-limit-* headers: {status} {body[:300]!r}")
    return int(found["x-ratelimit-limit-requests"]), int(found["x-ratelimit-limit-tokens"])


def wait_for_minute(offset_s: float, say: bool = True) -> None:
    """Sleep until the next calendar minute (UTC, the proxy's clock) plus ``offset_s``: a fresh window.

    Said on stderr (the probe's Markdown goes to stdout).
    """
    now = datetime.datetime.now(datetime.UTC)
    wait = 60.0 - now.second - now.microsecond / 1e6 + offset_s
    if say:
        start = (now + datetime.timedelta(seconds=wait)).strftime("%H:%M:%S")
        print(f"waiting {wait:.0f} s for the next calendar minute (LiteLLM counts per calendar minute): "
              f"the run starts at {start} UTC", file=sys.stderr, flush=True)
    time.sleep(wait)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S.%f")[:-3]


async def spend_window(proxy: Proxy, max_requests: int, concurrency: int = 16) -> tuple[int, int, str]:
    """Send up to ``max_requests`` through the SDK (``max_retries=0``) at once; (200s, 429s, first 429 seen)."""
    import openai

    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=proxy.key, max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    counts: collections.Counter[int] = collections.Counter()
    first: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                await client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS,
                                                     messages=[{"role": "user", "content": "Say hello."}])
                counts[200] += 1
            except openai.APIStatusError as error:
                counts[error.status_code] += 1
                if not first:
                    seen = error.response.headers
                    first.append(f"{type(error).__name__} (status {error.status_code}); "
                                 f"retry-after={seen.get('retry-after')}; "
                                 f"llm_provider-retry-after={seen.get('llm_provider-retry-after')}; "
                                 f"body={error.body!r}")

    async with client:
        await asyncio.gather(*(one() for _ in range(max_requests)))
    return counts[200], counts[429], first[0] if first else "-"



# ------------------------------------------------------------------ the benchmark


def write_input(path: Path, count: int, seed: int = 0) -> None:
    """``count`` Batch API chat requests with prompts of 20-60 words and ``max_tokens`` 50."""
    with path.open("wb") as out:
        for i, text in enumerate(prompts(count, seed)):
            out.write(chat_line(f"request-{i}", text, MAX_TOKENS, MODEL))


def read_output(path: Path) -> tuple[int, collections.Counter[str], int]:
    """(succeeded, failures by error code, tokens the proxy counted: the answers' usage) of a run's output."""
    succeeded, tokens = 0, 0
    failures: collections.Counter[str] = collections.Counter()
    if not path.exists():
        return succeeded, failures, tokens
    with path.open("rb") as file:
        for raw in file:
            line = orjson.loads(raw)
            if line.get("error"):
                failures[str(line["error"].get("code"))] += 1
                continue
            succeeded += 1
            usage = (line.get("response") or {}).get("body", {}).get("usage") or {}
            tokens += int(usage.get("total_tokens") or 0)
    return succeeded, failures, tokens


def events(stderr: bytes) -> dict[str, dict[str, Any]]:
    """The last JSON event of each kind the CLI wrote (``run_summary``, ``run_progress``...)."""
    found: dict[str, dict[str, Any]] = {}
    for raw in stderr.splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            line = orjson.loads(raw)
            if isinstance(line, dict) and "event" in line:
                found[str(line["event"])] = line
    return found


def run_once(proxy: Proxy, mode: str, requests: int, rpm: int, tpm: int, folder: Path, align_s: float | None,
             run: int, spent: bool = False) -> dict[str, Any]:
    """One ``scheduler run`` in ``mode``; its figures. ``spent``: another client spends the minute's requests first."""
    source, output = folder / f"input-{requests}.jsonl", folder / f"output-{mode}-{run}.jsonl"
    if not source.exists():
        write_input(source, requests)
    output.unlink(missing_ok=True)
    flags = {"rpm": ["--rpm", str(rpm)], "tpm": ["--tpm", str(tpm)]}
    command = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output),
               "--base-url", proxy.base_url, *(arg for name in MODES[mode] for arg in flags[name])]
    time_limit = max(300.0, 8 * 60.0 * requests / rpm)
    if align_s is not None:
        wait_for_minute(align_s)
    spent_by_other = 0
    if spent:
        spent_by_other, _, _ = asyncio.run(spend_window(proxy, rpm + 5))
        print(f"another client spent the window first: {spent_by_other} requests (at {_now()} UTC)", flush=True)
        time.sleep(0.3)  # the access log's last lines
    print(f"run {run + 1}, mode {mode}: {' '.join(['scheduler', *command[3:]])}", flush=True)
    since = proxy.log_size()
    now = datetime.datetime.now(datetime.UTC)
    # In a spent window nothing can succeed before the minute turns.
    blocked = 60.0 - now.second - now.microsecond / 1e6 if spent else 0.0
    began = time.perf_counter()
    timed_out = False
    try:
        done = subprocess.run(command, env={**os.environ, "OPENAI_API_KEY": proxy.key}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=time_limit)
        stderr, code = done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        stderr, code, timed_out = expired.stderr or b"", None, True
    wall = time.perf_counter() - began
    time.sleep(0.5)  # the access log's last lines
    statuses = proxy.statuses(since)
    succeeded, failures, tokens = read_output(output)
    minimum = blocked + 60.0 * max(requests / rpm, tokens / tpm)
    seen = events(stderr)
    summary, progress = seen.get("run_summary", {}), seen.get("run_progress", {})
    return {
        "mode": mode, "window": "spent" if spent else "fresh", "spent_by_other": spent_by_other, "run": run + 1,
        "requests": requests, "exit_code": code, "timed_out": timed_out,
        "wall_s": round(wall, 2), "elapsed_s": summary.get("elapsed_s"), "minimum_s": round(minimum, 2),
        "efficiency": round(minimum / wall, 3) if succeeded == requests and wall > 0 else None,
        "succeeded": succeeded, "failed": sum(failures.values()), "failures": dict(failures),
        "proxy_requests": sum(statuses.values()), "proxy_429s": statuses.get(429, 0),
        "proxy_other": {str(k): v for k, v in statuses.items() if k not in (200, 429)},
        "client_retries": progress.get("retries"), "client_rate_limited": progress.get("rate_limited"),
        "proxy_tokens": tokens, "message": summary.get("message") or stderr.decode(errors="replace")[-500:],
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode and window: the median and the worst wall time and efficiency, the 429s and failures in all."""
    out = []
    for mode, window in dict.fromkeys((row["mode"], row["window"]) for row in rows):
        mine = [row for row in rows if row["mode"] == mode and row["window"] == window]
        walls = [row["wall_s"] for row in mine]
        out.append({
            "mode": mode, "window": window, "runs": len(mine), "median_wall_s": round(statistics.median(walls), 2),
            "worst_wall_s": max(walls), "minimum_s": max(row["minimum_s"] for row in mine),
            "median_efficiency": round(statistics.median(row["efficiency"] or 0.0 for row in mine), 3),
            "worst_efficiency": min(row["efficiency"] or 0.0 for row in mine),
            "proxy_429s": sum(row["proxy_429s"] for row in mine), "failed": sum(row["failed"] for row in mine),
        })
    return out


COLUMNS = ("mode", "window", "run", "wall_s", "elapsed_s", "minimum_s", "efficiency", "succeeded", "failed",
           "proxy_requests", "proxy_429s", "client_retries", "proxy_tokens")
SUMMARY_COLUMNS = ("mode", "window", "runs", "median_wall_s", "worst_wall_s", "minimum_s", "median_efficiency",
                   "worst_efficiency", "proxy_429s", "failed")


def benchmark(python: Path, config: Path, requests: int, runs: int, modes: Sequence[str],
              align_s: float | None, windows: Sequence[str] = ("fresh",)) -> dict[str, Any]:
    where = machine()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scheduler-bench-litellm-") as name:
        folder = Path(name)
        print("starting LiteLLM's proxy (this takes a while)...", flush=True)
        with litellm_proxy(python, config_text(config), folder) as proxy:
            rpm, tpm = limits_of(proxy)
            print(f"proxy at {proxy.base_url}: {rpm} RPM, {tpm:,} TPM", flush=True)
            for run in range(runs):
                for mode in modes:
                    for window in windows:
                        rows.append(run_once(proxy, mode, requests, rpm, tpm, folder, align_s, run,
                                             spent=window == "spent"))
                        print(table(rows[-1:], COLUMNS), flush=True)
                        print(f"  {rows[-1]['message']}", flush=True)
    summary = aggregate(rows)
    print()
    print(table(summary, SUMMARY_COLUMNS))
    return {"machine": where, "litellm": _version(python), "limits": {"rpm": rpm, "tpm": tpm}, "rows": rows,
            "summary": summary}


def _version(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


# ------------------------------------------------------------------ the probe: the dialect's facts, verbatim


def _capture(title: str, status: int, headers: list[tuple[str, str]], body: bytes) -> str:
    lines = [f"### {title}", "", "```http", f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers), "",
             body.decode(errors="replace"), "```", ""]
    return "\n".join(lines)


def _pick(headers: list[tuple[str, str]], *names: str) -> str:
    found = {k.lower(): v for k, v in headers}
    return " ".join(f"{name}={found.get(name, '-')}" for name in names)


def probe(python: Path, config: Path) -> str:
    """The facts of LiteLLM's rate-limit dialect as Markdown, from live requests (takes about 3 minutes)."""
    import openai

    out = [f"# LiteLLM {_version(python)}: captures (made by `python benchmarks/bench_litellm.py --probe`)", ""]
    headers_of = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens",
                  "x-ratelimit-remaining-tokens", "date")
    with tempfile.TemporaryDirectory(prefix="scheduler-probe-litellm-") as name:
        folder = Path(name)
        with litellm_proxy(python, config_text(config), folder) as proxy:
            rpm, tpm = limits_of(proxy)
            wait_for_minute(1.0)
            out.append(_capture(f"A success (raw HTTP, sent at {_now()} UTC; limits {rpm} RPM, {tpm} TPM)",
                                *post(proxy, "Explain token buckets in one sentence.")))
            sdk = openai.OpenAI(base_url=proxy.base_url, api_key=proxy.key, max_retries=0)
            raw = sdk.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "Say hello."}])
            usage = raw.parse().usage
            out += ["### The same through the openai SDK (`with_raw_response`, `max_retries=0`)", "", "```",
                    f"status {raw.status_code}; usage {usage.model_dump(exclude_none=True) if usage else None}",
                    _pick(list(raw.headers.items()), *headers_of), "```", ""]
            ok, limited, first = asyncio.run(spend_window(proxy, rpm + 20))
            out += [f"### RPM spent: {rpm + 20} requests at once through the SDK (done at {_now()} UTC)", "", "```",
                    f"{ok} succeeded, {limited} got 429 within the minute; the first 429 as the SDK raised it:",
                    first, "```", ""]
            out.append(_capture(f"An RPM 429 (raw HTTP, sent at {_now()} UTC)", *post(proxy, "Say hello.")))
            now = datetime.datetime.now(datetime.UTC)
            time.sleep(max(0.0, 60.0 - now.second - now.microsecond / 1e6 - 3.0))
            out += ["### The window turns at the calendar minute: one request a second around :00", "", "```"]
            for _ in range(7):
                status, headers, _body = post(proxy, "Say hello.")
                out.append(f"{_now()} {status} " + _pick(headers, *headers_of))
                time.sleep(1.0)
            out += ["```", ""]
            sdk.close()
        with litellm_proxy(python, config_text(config, tpm=100), folder) as proxy:
            wait_for_minute(1.0)
            out += ["### Tokens: what is counted (the deployment's TPM set to 100)", "", "```"]
            # A long prompt is refused where short ones pass: admission adds the prompt's tokens to the count.
            for words, max_tokens in ((2, 1000), (2, 5), (60, 50), (2, 50), (2, 50), (2, 50)):
                status, headers, body = post(proxy, " ".join(["hello"] * words), max_tokens)
                usage = orjson.loads(body).get("usage") if status == 200 else None
                out.append(f"{_now()} prompt of {words} words, max_tokens={max_tokens}: {status} usage={usage} "
                           + _pick(headers, "x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests"))
            out += ["```", ""]
            out.append(_capture(f"A TPM 429 (raw HTTP, sent at {_now()} UTC)", *post(proxy, "Say hello.")))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per run (default 500)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each mode (default 1)")
    parser.add_argument("--modes", default="rpm+tpm,rpm",
                        help=f"comma-separated, of {', '.join(MODES)} (limits given to scheduler run; default "
                        "rpm+tpm,rpm)")
    parser.add_argument("--litellm-python", help="Python of LiteLLM's environment (default: $LITELLM_PYTHON, "
                        "else benchmarks/litellm/.venv/bin/python)")
    parser.add_argument("--windows", default="fresh",
                        help="comma-separated: fresh (the run starts in an unused minute), spent (another client "
                        "spends the minute's requests just before the run starts); default fresh")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the proxy's config")
    parser.add_argument("--align-s", type=float, default=2.0,
                        help="start each run this long after a calendar minute begins (default 2)")
    parser.add_argument("--no-align", action="store_true", help="start each run at once (the window may be spent)")
    parser.add_argument("--json", type=Path, default=RESULTS / "litellm.json")
    parser.add_argument("--probe", action="store_true", help="print the dialect's captures as Markdown instead")
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    if unknown := [mode for mode in modes if mode not in MODES]:
        parser.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(MODES)})")
    windows = [window for window in args.windows.split(",") if window]
    if not windows or any(window not in ("fresh", "spent") for window in windows):
        parser.error(f"--windows: fresh and/or spent, not {args.windows!r}")
    try:
        python = proxy_python(args.litellm_python)
        if args.probe:
            print(probe(python, args.config))
            return
        out = benchmark(python, args.config, args.requests, args.runs, modes, None if args.no_align else args.align_s,
                        windows)
    except SetupError as exc:
        print(f"bench_litellm: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(args.json, out)


if __name__ == "__main__":
    main()
