"""Cost tiers end to end: ``scheduler run --tier batch|flex|auto``, ``scheduler estimate``, ``run --dry-run`` and
``scheduler batches status|cancel``, each as a subprocess through the real SDK against the mock server (run in
this test's event loop, so its counters can be read; its Batch API accelerated to seconds)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from scheduler.cost import PriceTable
from scheduler.mock import MockConfig, MockServer
from scheduler.mock.batch_config import BatchMockConfig
from scheduler.results import Usage
from tests.test_cli import REPO, env, line_count, read_output, summary

pytestmark = pytest.mark.anyio

FAST = BatchMockConfig(step_s=0.02, lines_per_s=2_000)
FLEX_MODEL = "gpt-5-mini"  # offered on flex


def write_chats(path: Path, count: int, model: str = "gpt-4o-mini", max_tokens: int = 8) -> list[str]:
    ids = [f"r{i}" for i in range(count)]
    with path.open("wb") as file:
        for i, custom_id in enumerate(ids):
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"item{i} please " * (1 + i % 3)}]}
            file.write(orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}) + b"\n")
    return ids


@asynccontextmanager
async def mock(batch: BatchMockConfig = FAST, **config: Any) -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(batch=batch, **config)) as server:
        yield server


def scheduler_cmd(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "scheduler", *args]


def run_cmd(source: Path, output: Path, server: MockServer, *args: str) -> list[str]:
    return scheduler_cmd("run", str(source), "-o", str(output), "--base-url", server.base_url, *args)


async def scheduler(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(scheduler_cmd(*args), check=False, cwd=REPO, env=env())


async def run(source: Path, output: Path, server: MockServer, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(run_cmd(source, output, server, *args), check=False, cwd=REPO, env=env())


def once(output: Path, ids: list[str]) -> list[dict[str, Any]]:
    """Every id exactly once in the output (whole Batch API output lines); the records."""
    records = read_output(output)
    counts = Counter(r["custom_id"] for r in records)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}, "every id exactly once"
    return records


def journal_types(output: Path) -> list[str]:
    """The types of the batch journal's whole lines (a running process may be writing the last one)."""
    state = output.with_name(output.name + ".batches")
    whole = state.read_bytes().split(b"\n")[:-1] if state.exists() else []
    return [orjson.loads(line)["type"] for line in whole]


BATCH = ("--tier", "batch", "--poll-interval", "0.05")


async def test_batch_tier_writes_every_line_as_batch_output_and_a_rerun_sends_nothing(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 45)
    async with mock() as server:
        done = await run(source, output, server, *BATCH, "--batch-size", "20")
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        prices = PriceTable()
        for record in records:
            extra = record["scheduler"]
            assert record["error"] is None and extra["tier"] == "batch"
            assert extra["batch_id"] in server.batches.batch_ids()
            assert len(extra["request_hash"]) == 12  # resume checks work as for online runs
            usage = Usage.from_body(record["response"]["body"])
            standard = prices.cost("gpt-4o-mini", usage)
            assert standard is not None and extra["cost_usd"] == pytest.approx(standard / 2, abs=1e-8)  # 8 decimals
        assert server.batches.creates == 3  # 20 + 20 + 5
        figures = summary(done.stderr)
        assert figures["tier"] == "batch" and figures["batches"] == 3 and figures["batches_running"] == 0
        assert figures["cost_by_tier"]["batch"] == pytest.approx(figures["cost_usd"])
        assert figures["saved_usd"] == pytest.approx(figures["cost_usd"], rel=1e-3)  # half price: saved as much
        assert server.stats()["requests"] == 0  # nothing went online

        again = await run(source, output, server, *BATCH, "--batch-size", "20")
        assert again.returncode == 0 and b"Nothing to do" in again.stderr
        assert server.batches.creates == 3 and line_count(output) == 45


async def test_batch_tier_retries_failed_lines_in_a_later_batch(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 12)
    async with mock() as server:
        server.batches.script_line("r3", 500)
        server.batches.script_line("r5", "request_timeout")
        server.batches.script_line("r8", 400)
        done = await run(source, output, server, *BATCH)
        assert done.returncode == 1, done.stderr  # r8 was refused: a failure, as online
        by_id = {r["custom_id"]: r for r in once(output, ids)}
        for custom_id in ("r3", "r5"):
            assert by_id[custom_id]["error"] is None and by_id[custom_id]["scheduler"]["attempts"] == 2
        assert by_id["r8"]["error"]["code"] == "request_rejected"
        assert server.batches.creates == 2
        assert summary(done.stderr)["batch_retried"] == 2


async def test_batch_tier_collects_an_expired_batch_and_resubmits_the_rest(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 10)
    async with mock() as server:
        server.batches.expire_next(after_lines=4)
        done = await run(source, output, server, *BATCH)
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        expired, resubmitted = server.batches.batch_ids()
        assert sum(1 for r in records if r["scheduler"]["batch_id"] == expired) == 4
        assert {r["scheduler"]["attempts"] for r in records if r["scheduler"]["batch_id"] == resubmitted} == {2}


async def test_batch_tier_backs_off_on_the_enqueued_token_limit(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 30)
    # A batch of 10 of these lines enqueues about 60 tokens: the limit lets one run at a time.
    async with mock(BatchMockConfig(step_s=0.02, lines_per_s=100, enqueued_token_limit=90)) as server:
        done = await run(source, output, server, *BATCH, "--batch-size", "10")
        assert done.returncode == 0, done.stderr
        once(output, ids)
        refusals = summary(done.stderr)["batch_refusals"]
        assert refusals >= 1
        assert server.batches.creates == 3 + refusals  # a refusal costs a creation, never a duplicate line


@pytest.mark.parametrize("journal", ["whole", "without_delivered"])
async def test_kill_9_while_polling_then_rerun_submits_no_batch_twice_and_writes_no_line_twice(
    tmp_path: Path, journal: str,
) -> None:
    """``without_delivered``: a batch's lines are written, then the journal records it delivered; a kill between
    the two leaves lines the journal does not know of. Made exactly, by killing after both and taking the record
    out."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 50)
    # Two batches: r0-r39 take 10 s in the mock, r40-r49 take 2.5 s; kill once the small one is written (the
    # big one still running, however slowly a busy machine starts the process and polls).
    async with mock(BatchMockConfig(step_s=0.01, lines_per_s=4)) as server:
        cmd = run_cmd(source, output, server, *BATCH, "--batch-size", "40")
        async with await anyio.open_process(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL) as process:
            with anyio.fail_after(30):
                # Its lines are written, then the journal says so: kill after both, or the journal's state
                # below is a race (the rerun's guarantees hold either way).
                while line_count(output) < 10 or "delivered" not in journal_types(output):
                    await anyio.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            await process.wait()
        types = journal_types(output)
        assert types.count("batch") == 2 and types.count("delivered") == 1  # one batch still running: polled
        assert server.batches.creates == 2
        if journal == "without_delivered":
            state = output.with_name(output.name + ".batches")
            kept = [line for line in state.read_bytes().split(b"\n")[:-1] if orjson.loads(line)["type"] != "delivered"]
            state.write_bytes(b"".join(line + b"\n" for line in kept))
            assert line_count(output) == 10 and "delivered" not in journal_types(output)

        done = await run(source, output, server, *BATCH, "--batch-size", "40")
        assert done.returncode == 0, done.stderr
        once(output, ids)  # 0 duplicate lines
        assert server.batches.creates == 2  # 0 batches submitted twice


async def test_ctrl_c_leaves_the_batches_running_and_says_how_to_resume_or_cancel(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 40)
    # The batch takes 10 s: it is still running while the test looks at it and cancels it.
    async with mock(BatchMockConfig(step_s=0.01, lines_per_s=4)) as server:
        cmd = run_cmd(source, output, server, *BATCH)
        async with await anyio.open_process(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE) as process:
            with anyio.fail_after(30):
                while "batch" not in journal_types(output):
                    await anyio.sleep(0.02)
            await anyio.sleep(0.5)  # some lines complete
            process.send_signal(signal.SIGINT)
            code = await process.wait()
            assert process.stderr is not None
            stderr = b"".join([chunk async for chunk in process.stderr])
        assert code == 130
        message = summary(stderr)["message"]
        assert "keep running on the API" in message and f"scheduler batches cancel {output}" in message
        assert summary(stderr)["batches_running"] == 1
        [batch_id] = server.batches.batch_ids()

        status = await scheduler("batches", "status", str(output), "--base-url", server.base_url, "--json")
        assert status.returncode == 0, status.stderr
        [part] = [orjson.loads(line) for line in status.stdout.splitlines()]
        assert part["batch_id"] == batch_id and part["status"] == "in_progress" and not part["delivered"]

        cancel = await scheduler("batches", "cancel", str(output), "--base-url", server.base_url)
        assert cancel.returncode == 0, cancel.stderr
        assert batch_id.encode() in cancel.stdout and server.batches.cancels == 1

        server.batches.config = dataclasses.replace(server.batches.config, batch=FAST)  # the next batch: at once
        done = await run(source, output, server, *BATCH)
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        kept = sum(1 for r in records if r["scheduler"]["batch_id"] == batch_id)
        assert 0 < kept < 40  # what the cancelled batch finished is written, the rest ran in a new batch
        assert server.batches.creates == 2


async def test_flex_tier_retries_capacity_429s_apart_from_rate_limits(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 20, model=FLEX_MODEL)
    async with mock(flex_capacity=0.7, seed=3) as server:
        done = await run(source, output, server, "--tier", "flex")
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        assert {r["scheduler"]["tier"] for r in records} == {"flex"}
        figures = summary(done.stderr)
        refused = server.stats()["flex"]["unavailable"]
        assert refused > 0 and figures["capacity_refused"] == refused
        assert figures["rate_limited"] == 0 and figures["pauses"] == 0
        assert figures["saved_usd"] == pytest.approx(figures["cost_usd"], rel=1e-3)  # flex: batch rates


async def test_flex_fallback_sends_what_flex_cannot_serve_at_the_standard_tier(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 10, model=FLEX_MODEL)
    async with mock(flex_capacity=0.0) as server:
        done = await run(source, output, server, "--tier", "flex", "--flex-fallback", "standard")
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        assert {r["scheduler"]["tier"] for r in records} == {"standard"}
        assert summary(done.stderr)["flex_fallbacks"] == 10 == server.stats()["flex"]["unavailable"]


async def test_auto_cuts_over_to_online_before_a_short_deadline(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 40, model=FLEX_MODEL)
    # The Batch API would take 20 s; online at 600 RPM takes 4 s (5 s with the safety margin): a 12 s deadline
    # cuts over about 5 s in.
    async with mock(BatchMockConfig(step_s=0.05, lines_per_s=2)) as server:
        done = await run(source, output, server, "--tier", "auto", "--deadline", "12s", "--rpm", "600",
                         "--tpm", "1000000", "--poll-interval", "0.05")
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        tiers = Counter(r["scheduler"]["tier"] for r in records)
        assert set(tiers) <= {"batch", "flex"} and tiers["flex"] > 0  # the model offers flex: the rest ran on it
        assert server.batches.creates == 1 and server.batches.cancels == 1
        [batch_id] = server.batches.batch_ids()
        assert all(r["scheduler"]["batch_id"] == batch_id for r in records if r["scheduler"]["tier"] == "batch")
        figures = summary(done.stderr)
        assert figures["tier"] == "auto" and set(figures["cost_by_tier"]) <= {"batch", "flex"}
        assert b"tier_cutover" in done.stderr


async def test_auto_with_no_time_for_batches_runs_everything_online_and_submits_none(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_chats(source, 20)  # gpt-4o-mini: not offered on flex, so the rest runs at the standard tier
    async with mock() as server:
        done = await run(source, output, server, "--tier", "auto", "--deadline", "3s", "--rpm", "600")
        assert done.returncode == 0, done.stderr
        records = once(output, ids)
        assert {r["scheduler"]["tier"] for r in records} == {"standard"}
        assert server.batches.creates == 0 and server.batches.uploads == 0


async def test_estimate_streams_the_input_and_prices_each_tier(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_chats(source, 30, max_tokens=100)
    with source.open("ab") as file:
        file.write(b'{"custom_id": "bad", "method": "GET"}\n')
        file.write(orjson.dumps({"custom_id": "f1", "model": FLEX_MODEL, "messages": [
            {"role": "user", "content": "no cap"}]}) + b"\n")
    done = await scheduler("estimate", str(source), "--rpm", "60", "--tpm", "1000000", "--json")
    assert done.returncode == 0, done.stderr
    figures = orjson.loads(done.stdout)
    assert (figures["requests"], figures["invalid_lines"]) == (31, 1)
    assert figures["output_reserved"] == 30 * 100 + 1024  # the caps, and the default for the line without one
    assert figures["models"][FLEX_MODEL]["uncapped"] == 1 and figures["prompt_tokens"] > 30 * 3
    tiers = {t["tier"]: t for t in figures["tiers"]}
    assert set(tiers) == {"standard", "flex", "batch"}
    standard, batch = tiers["standard"], tiers["batch"]
    assert batch["worst_case_usd"] == pytest.approx(standard["worst_case_usd"] / 2, rel=1e-3)
    assert standard["expected_usd"] < standard["worst_case_usd"]
    # Each model has its own limits and runs beside the others: gpt-4o-mini's 30 requests at 60 RPM decide.
    assert standard["seconds"] == pytest.approx(30.0)
    assert tiers["flex"]["worst_case_usd"] is None and "gpt-4o-mini" in tiers["flex"]["note"]

    table = await scheduler("estimate", str(source), "--tier", "auto", "--deadline", "6h", "--rpm", "60")
    assert table.returncode == 0, table.stderr
    assert b"auto" in table.stdout and b"Batch API until" in table.stdout
    missing = await scheduler("estimate", str(source), "--tier", "auto")
    assert missing.returncode == 2 and b"--deadline" in missing.stderr


async def test_dry_run_prints_the_plan_and_sends_nothing(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_chats(source, 12)
    async with mock() as server:
        done = await run(source, output, server, "--tier", "batch", "--dry-run")
        assert done.returncode == 0, done.stderr
        assert b"--tier batch; nothing sent" in done.stdout and b"requests          12" in done.stdout
        assert b"batch" in done.stdout and b"-50%" in done.stdout
        assert not output.exists() and server.stats()["requests"] == 0 and server.batches.uploads == 0


async def test_tier_flags_that_do_not_fit_exit_2(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_chats(source, 2)
    async with mock() as server:
        for args, message in [
            (("--tier", "auto"), b"--deadline"),
            (("--deadline", "1h"), b"--tier auto"),
            (("--tier", "batch", "--budget", "1"), b"--budget"),
            (("--flex-fallback", "standard"), b"--tier flex"),
            (("--tier", "auto", "--deadline", "1h"), b"--rpm"),
            (("--tier", "auto", "--deadline", "soon"), b"not a duration"),
        ]:
            done = await run(source, output, server, *args)
            assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert not output.exists()
