"""End-to-end tests of ``scheduler run``: the CLI as a subprocess against the mock server.

The mock runs in this test's event loop (``MockServer``) so its counters can be read, or inside the CLI
(``--mock``). Workloads are small and limits high: the few seconds each test takes are mostly start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from scheduler.mock import MockConfig, MockServer

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789"
WRONG_KEY = "sk-wrong-secret-123456"


def write_input(path: Path, count: int) -> list[str]:
    """``count`` Batch API lines of varied length; returns their ids."""
    ids = [f"req-{i:04d}" for i in range(count)]
    with path.open("wb") as file:
        for i, custom_id in enumerate(ids):
            body = {"model": "gpt-4o-mini", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "count the sheep " * (1 + i % 20)}]}
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
            file.write(orjson.dumps(line) + b"\n")
    return ids


def read_output(path: Path) -> list[dict[str, Any]]:
    """Every output line, checked to be a whole Batch API output record."""
    data = path.read_bytes() if path.exists() else b""
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    records = [orjson.loads(line) for line in data.splitlines()]
    for record in records:
        assert set(record) == {"id", "custom_id", "response", "error", "scheduler"}
        assert record["id"].startswith("batch_req_")
        if record["error"] is None:
            response = record["response"]
            assert response["status_code"] == 200
            assert isinstance(response["request_id"], str)
            assert response["body"]["object"] in ("chat.completion", "list")
        else:
            assert set(record["error"]) == {"code", "message"}
    return records


def id_counts(path: Path) -> Counter[str]:
    return Counter(record["custom_id"] for record in read_output(path))


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def env(key: str = KEY) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    environment["OPENAI_API_KEY"] = key
    return environment


def command(source: Path, output: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output), *args]


async def run(source: Path, output: Path, *args: str, key: str = KEY) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(command(source, output, *args), check=False, cwd=REPO, env=env(key))


def summary(stderr: bytes) -> dict[str, Any]:
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    [found] = [line for line in lines if line.get("event") == "run_summary"]
    return found


async def start_then(
    tmp_path: Path, cmd: list[str], lines: int, action: str
) -> tuple[int, bytes]:
    """Run ``cmd``; once its output has ``lines`` lines, send SIGKILL or SIGINT; return (exit code, stderr)."""
    output = Path(cmd[cmd.index("-o") + 1])
    with (tmp_path / "stderr.txt").open("w+b") as err:
        async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                            env=env()) as process:
            with anyio.fail_after(30):
                while line_count(output) < lines:
                    await anyio.sleep(0.01)
            process.send_signal(signal.SIGKILL if action == "kill" else signal.SIGINT)
            code = await process.wait()
        err.seek(0)
        return code, err.read()


@pytest.mark.anyio
async def test_full_run_of_the_example_with_mock(tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    done = await run(REPO / "examples" / "requests.jsonl", output, "--mock")
    assert done.returncode == 0, done.stderr
    expected = sum(1 for line in (REPO / "examples" / "requests.jsonl").read_bytes().splitlines() if line.strip())
    counts = id_counts(output)
    assert len(counts) == expected and set(counts.values()) == {1}
    assert all(record["error"] is None for record in read_output(output))
    assert summary(done.stderr)["succeeded"] == expected
    assert done.stdout == b""  # results go to the file, progress to stderr


@pytest.mark.anyio
async def test_kill_9_at_half_then_resume(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 200)
    async with MockServer(MockConfig(latency_ms=40)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "4")
        code, _ = await start_then(tmp_path, cmd, 100, "kill")
        assert code == -signal.SIGKILL
        assert 100 <= line_count(output) < 200
        done = await run(source, output, "--base-url", server.base_url, "--workers", "32")
        assert done.returncode == 0, done.stderr
    counts = id_counts(output)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    assert summary(done.stderr)["already_done"] >= 100


@pytest.mark.anyio
async def test_torn_last_line_is_repaired_on_resume(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 30)
    async with MockServer(MockConfig()) as server:
        first = await run(source, output, "--base-url", server.base_url)
        assert first.returncode == 0, first.stderr
        # A crash in the middle of a write: the last record loses its end and its newline.
        data = output.read_bytes()
        output.write_bytes(data[: len(data) - 25])
        torn_id = orjson.loads(data.splitlines()[-1])["custom_id"]
        again = await run(source, output, "--base-url", server.base_url)
        assert again.returncode == 0, again.stderr
    assert b"output_repaired" in again.stderr
    assert summary(again.stderr)["succeeded"] == 1  # only the torn one ran again
    counts = id_counts(output)
    assert sorted(counts) == ids and set(counts.values()) == {1} and torn_id in counts


@pytest.mark.anyio
async def test_malformed_lines_become_error_records(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = {"custom_id": "good", "prompt": "hello", "max_tokens": 5}
    source.write_bytes(b"\n".join([
        orjson.dumps(good),
        b'{"custom_id": "broken", "prompt": ',
        b'{"custom_id": "nan", "prompt": "x", "temperature": NaN}',  # not JSON: named line-3
        b'{"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
        b'{"custom_id": "url", "method": "POST", "url": "/v1/nowhere", "body": {}}',
        b'{"custom_id": "body", "method": "POST", "url": "/v1/chat/completions", "body": "text"}',
        b'{"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"}',
        b'{"messages": [{"role": "user", "content": "bare body, no id"}], "max_tokens": 5}',
    ]) + b"\n")
    async with MockServer(MockConfig()) as server:
        done = await run(source, output, "--base-url", server.base_url)
        assert server.stats()["requests"] == 2
    assert done.returncode == 1, done.stderr
    by_id = {record["custom_id"]: record for record in read_output(output)}
    assert by_id["good"]["error"] is None and by_id["line-8"]["error"] is None
    expected = {"line-2": 2, "line-3": 3, "get": 4, "url": 5, "body": 6, "nobody": 7}
    for custom_id, number in expected.items():
        error = by_id[custom_id]["error"]
        assert error["code"] == "invalid_request"
        assert error["message"].startswith(f"line {number}: ")
    warnings = [orjson.loads(line) for line in done.stderr.splitlines() if b'"invalid_line"' in line]
    assert sorted(w["line"] for w in warnings) == [2, 3, 4, 5, 6, 7]
    assert all(w["file"] == str(source) for w in warnings)
    assert summary(done.stderr)["invalid_lines"] == 6


@pytest.mark.anyio
async def test_duplicate_ids_stop_the_run_before_any_request(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 10)
    with source.open("ab") as file:
        file.write(b'{"custom_id": "req-0003", "prompt": "again"}\n')
    async with MockServer(MockConfig()) as server:
        done = await run(source, output, "--base-url", server.base_url)
        assert server.stats()["requests"] == 0
    assert done.returncode == 2
    assert b"'req-0003' on lines 4, 11" in done.stderr
    assert not output.exists()


@pytest.mark.anyio
async def test_unusable_arguments_exit_2(tmp_path: Path) -> None:
    missing = await run(tmp_path / "missing.jsonl", tmp_path / "out.jsonl", "--mock")
    assert missing.returncode == 2 and b"no such input file" in missing.stderr
    source = tmp_path / "in.jsonl"
    write_input(source, 1)
    bad_flag = await run(source, tmp_path / "out.jsonl", "--workers", "0")
    assert bad_flag.returncode == 2 and b"--workers" in bad_flag.stderr


@pytest.mark.anyio
async def test_quota_exhaustion_exits_3_and_a_later_run_finishes(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 40)
    async with MockServer(MockConfig(quota_after=10)) as server:
        stopped = await run(source, output, "--base-url", server.base_url, "--workers", "2")
    assert stopped.returncode == 3, stopped.stderr
    message = summary(stopped.stderr)["message"]
    assert "quota" in message and "run the same command again" in message
    records = read_output(output)
    # Jobs the stop kept from running are not written: they stay for the next run.
    assert len(records) == 10 and all(record["error"] is None for record in records)
    async with MockServer(MockConfig()) as fresh:
        finished = await run(source, output, "--base-url", fresh.base_url)
        assert fresh.stats()["requests"] == 30
    assert finished.returncode == 0, finished.stderr
    counts = id_counts(output)
    assert sorted(counts) == ids and set(counts.values()) == {1}


@pytest.mark.anyio
async def test_refused_key_exits_3_without_showing_the_key(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 20)
    async with MockServer(MockConfig(api_key="right")) as server:
        done = await run(source, output, "--base-url", server.base_url, "-v", key=WRONG_KEY)
        assert server.stats()["unauthorized"] >= 1
    assert done.returncode == 3, done.stderr
    assert "refused the key" in summary(done.stderr)["message"]
    written = output.read_bytes() if output.exists() else b""
    for text in (done.stdout, done.stderr, written):
        assert WRONG_KEY.encode() not in text
        assert b"wrong-secret" not in text


@pytest.mark.anyio
async def test_ctrl_c_stops_gracefully_then_resume(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 200)
    async with MockServer(MockConfig(latency_ms=40)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "4")
        code, stderr = await start_then(tmp_path, cmd, 40, "interrupt")
        assert code == 130, stderr
        assert b"run the same command again" in stderr
        interrupted = summary(stderr)
        assert interrupted["not_done"] > 0
        # The requests in flight finished and were written; nothing was written twice.
        assert line_count(output) == interrupted["succeeded"]
        done = await run(source, output, "--base-url", server.base_url, "--workers", "32")
        assert done.returncode == 0, done.stderr
    counts = id_counts(output)
    assert sorted(counts) == ids and set(counts.values()) == {1}


@pytest.mark.anyio
async def test_mock_server_command() -> None:
    cmd = [sys.executable, "-m", "scheduler", "mock-server", "--port", "0", "--rpm", "100"]
    async with await anyio.open_process(cmd, cwd=REPO) as process:
        assert process.stderr is not None
        with anyio.fail_after(20):
            banner = b""
            while b"\n" not in banner:
                banner += await process.stderr.receive()
        assert b"listening on http://127.0.0.1:" in banner
        url = banner.split(b"listening on ", 1)[1].split()[0].decode()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /stats HTTP/1.0\r\nHost: x\r\n\r\n")
            reply = b""
            with anyio.fail_after(10):
                try:
                    while True:
                        reply += await stream.receive()
                except anyio.EndOfStream:
                    pass
        assert reply.startswith(b"HTTP/1.") and b'"requests":' in reply
        process.terminate()
        await process.wait()
