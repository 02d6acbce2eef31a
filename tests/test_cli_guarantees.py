"""`scheduler run` never hangs, never tears a line, and checks what it resumes: each way the output can fail, a
second run on the same output, a Redis outage and a changed input, driven for real against the CLI.

How the faults are made:

- file-size limit: ``RLIMIT_FSIZE`` set in the child (``preexec_fn``); the CLI ignores SIGXFSZ itself, so the
  write that crosses the limit writes part of the line and the next fails with EFBIG;
- disk full: a 8 KiB tmpfs mounted in a private mount namespace (``unshare --mount``), where root may mount;
  skipped where that is not allowed;
- permissions: ``chattr +i`` on the output mid-run (root ignores mode bits, not the immutable flag: the next
  write fails with EPERM); skipped where the file system has no such flag;
- the output (or its directory) deleted mid-run;
- Redis: a real ``redis-server`` stopped mid-run.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import anyio
import orjson
import pytest
from redis_server import RedisServer, free_port
from test_cli import (
    REPO,
    command,
    env,
    id_counts,
    line_count,
    read_output,
    run,
    summary,
    write_input,
)
from test_cli_features import redis_only

from scheduler.jsonl import parse_line, request_hash
from scheduler.mock import MockConfig, MockServer

pytestmark = pytest.mark.anyio


def no_traceback(stderr: bytes) -> None:
    assert b"Traceback" not in stderr, stderr.decode()


def assert_whole_lines(path: Path) -> None:
    """No torn line: the file ends with a newline and every line is a record (read_output checks both)."""
    read_output(path)


async def run_in_thread(
    cmd: list[str], extra_env: dict[str, str] | None = None, **options: object
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to its end without blocking the event loop (the mock server lives in it)."""
    environment = {**env(), "PYTHONDONTWRITEBYTECODE": "1", **(extra_env or {})}
    call = functools.partial(subprocess.run, cmd, cwd=REPO, env=environment, capture_output=True, timeout=60,
                             **options)
    return await anyio.to_thread.run_sync(call)


async def run_then(cmd: list[str], lines: int, action: object) -> tuple[int, bytes]:
    """Start ``cmd``; once its output has ``lines`` lines, call ``action()``; return (exit code, stderr)."""
    output = Path(cmd[cmd.index("-o") + 1])
    async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                                        env=env()) as process:
        assert process.stderr is not None
        stderr = bytearray()

        async def drain() -> None:
            assert process.stderr is not None
            async for chunk in process.stderr:
                stderr.extend(chunk)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(drain)
            with anyio.fail_after(30):
                while line_count(output) < lines:
                    await anyio.sleep(0.01)
                assert callable(action)
                action()
                code = await process.wait()
        return code, bytes(stderr)


# ---------------------------------------------------------------------------------------------- the output fails


async def test_a_file_size_limit_stops_the_run_at_once_and_leaves_no_torn_line(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 60)
    limit = 3000  # a few lines' worth: the line that crosses it is written in part, then refused

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as server:
        stopped = await run_in_thread(command(source, output, "--base-url", server.base_url, "--workers", "2"),
                                      preexec_fn=file_size_limit)
        no_traceback(stopped.stderr)
        assert stopped.returncode == 3, stopped.stderr.decode()
        message = summary(stopped.stderr)["message"]
        assert "file-size limit" in message and "run the same command again" in message
        assert_whole_lines(output)
        kept = line_count(output)
        assert 0 < kept < len(ids) and output.stat().st_size <= limit
        again = await run(source, output, "--base-url", server.base_url)
    assert again.returncode == 0, again.stderr.decode()
    assert summary(again.stderr)["already_done"] == kept
    assert id_counts(output) == dict.fromkeys(ids, 1)


def _can_mount_in_a_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=8k tmpfs /mnt"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_in_a_namespace(), reason="cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
async def test_a_full_disk_stops_the_run_at_once_and_leaves_no_torn_line(tmp_path: Path) -> None:
    source, disk, kept = tmp_path / "in.jsonl", tmp_path / "disk", tmp_path / "kept.jsonl"
    ids = write_input(source, 60)
    disk.mkdir()
    output = disk / "out.jsonl"
    async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as server:
        # The run in a mount namespace of its own, on an 8 KiB tmpfs; its output is copied out before the
        # namespace (and the tmpfs) goes away.
        script = 'mount -t tmpfs -o size=8k tmpfs "$0" && "$@"; code=$?; cp "$0/out.jsonl" "$KEPT"; exit $code'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(disk),
               *command(source, output, "--base-url", server.base_url, "--workers", "2")]
        stopped = await run_in_thread(cmd, {"KEPT": str(kept)})
        no_traceback(stopped.stderr)
        assert stopped.returncode == 3, stopped.stderr.decode()
        assert "the disk is full" in summary(stopped.stderr)["message"]
        assert_whole_lines(kept)
        assert 0 < line_count(kept) < len(ids)
        again = await run(source, kept, "--base-url", server.base_url)
    assert again.returncode == 0, again.stderr.decode()
    assert id_counts(kept) == dict.fromkeys(ids, 1)


def _immutable_flag_works(path: Path) -> bool:
    path.write_bytes(b"")
    try:
        works = shutil.which("chattr") is not None and subprocess.run(
            ["chattr", "+i", str(path)], capture_output=True, check=False).returncode == 0
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
        path.unlink()
    return works


async def test_an_output_made_unwritable_mid_run_stops_the_run_at_once(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if not _immutable_flag_works(tmp_path / "probe"):
        pytest.skip("chattr +i does not work here (file system, or not root)")
    ids = write_input(source, 200)
    async with MockServer(MockConfig(latency_ms=40)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "4")
        try:
            code, stderr = await run_then(cmd, 10, lambda: subprocess.run(["chattr", "+i", str(output)], check=True))
        finally:
            subprocess.run(["chattr", "-i", str(output)], check=True)
        no_traceback(stderr)
        assert code == 3, stderr.decode()
        assert "not permitted" in summary(stderr)["message"]
        assert_whole_lines(output)
        again = await run(source, output, "--base-url", server.base_url, "--workers", "32")
    assert again.returncode == 0, again.stderr.decode()
    assert id_counts(output) == dict.fromkeys(ids, 1)


@pytest.mark.parametrize("what", ["file", "directory"])
async def test_an_output_deleted_mid_run_stops_the_run_at_once(tmp_path: Path, what: str) -> None:
    source, folder = tmp_path / "in.jsonl", tmp_path / "results"
    folder.mkdir()
    output = folder / "out.jsonl"
    write_input(source, 200)
    delete = output.unlink if what == "file" else functools.partial(shutil.rmtree, folder)
    async with MockServer(MockConfig(latency_ms=40)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "4")
        code, stderr = await run_then(cmd, 10, delete)
        sent = server.stats()["requests"]
        await anyio.sleep(0.3)
        assert server.stats()["requests"] <= sent + 4  # it stopped: at most the requests in flight went on
    no_traceback(stderr)
    assert code == 3, stderr.decode()
    assert "was deleted" in summary(stderr)["message"] and "start over" in summary(stderr)["message"]


async def test_a_second_run_on_the_same_output_refuses_and_names_the_first(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 200)
    async with MockServer(MockConfig(latency_ms=40)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "4")
        async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                                            env=env()) as first:
            with anyio.fail_after(30):
                while line_count(output) < 10:
                    await anyio.sleep(0.01)
            second = await run(source, output, "--base-url", server.base_url)
            assert second.returncode == 2
            assert f"another run (pid {first.pid}) is writing {output}".encode() in second.stderr
            first_code = await first.wait()
    assert first_code == 0
    assert id_counts(output) == dict.fromkeys(ids, 1)  # the second run neither wrote nor repaired a line


# ---------------------------------------------------------------------------------------------- Redis


@redis_only
async def test_a_redis_outage_longer_than_the_grace_ends_with_exit_3_not_a_traceback(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 300)
    with RedisServer() as redis:
        async with MockServer(MockConfig(latency_ms=40)) as server:
            cmd = command(source, output, "--base-url", server.base_url, "--rpm", "60000", "--redis", redis.url,
                          "--redis-grace", "0.5", "--workers", "4")
            code, stderr = await run_then(cmd, 10, redis.stop)
            no_traceback(stderr)
            assert code == 3, stderr.decode()
            message = summary(stderr)["message"]
            assert f"cannot reach Redis at {redis.url}" in message and "run the same command again" in message
            assert_whole_lines(output)
            redis.start()
            again = await run(source, output, "--base-url", server.base_url, "--rpm", "60000", "--redis", redis.url)
    assert again.returncode == 0, again.stderr.decode()
    assert id_counts(output) == dict.fromkeys(ids, 1)


async def test_an_unreachable_redis_at_start_exits_2_and_leaves_no_file(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 2)
    closed = f"redis://:secret-pw@127.0.0.1:{free_port()}/0"
    done = await run(source, output, "--base-url", "http://127.0.0.1:9/v1", "--rpm", "60", "--redis", closed)
    assert done.returncode == 2, done.stderr.decode()
    assert b"cannot reach Redis" in done.stderr and b"secret-pw" not in done.stderr
    no_traceback(done.stderr)
    assert not output.exists()


# ---------------------------------------------------------------------------------------------- what is resumed


def input_hashes(path: Path) -> dict[str, str]:
    hashes = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        request = parse_line(number, raw, model="gpt-4o-mini").request
        assert request is not None
        hashes[request.custom_id or ""] = f"{request_hash(request.endpoint, request.body):012x}"
    return hashes


def change_lines(path: Path, numbers: list[int]) -> None:
    lines = path.read_bytes().splitlines()
    for number in numbers:
        line = orjson.loads(lines[number - 1])
        line["body"]["max_tokens"] = 7
        lines[number - 1] = orjson.dumps(line)
    path.write_bytes(b"\n".join(lines) + b"\n")


async def test_resume_refuses_a_changed_request_and_lists_it(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 12)
    async with MockServer(MockConfig()) as server:
        first = await run(source, output, "--base-url", server.base_url)
        assert first.returncode == 0, first.stderr.decode()
        hashes = input_hashes(source)
        assert {r["custom_id"]: r["scheduler"]["request_hash"] for r in read_output(output)} == hashes
        change_lines(source, [3, 8])
        refused = await run(source, output, "--base-url", server.base_url)
        assert server.stats()["requests"] == len(ids)  # nothing more was sent
    assert refused.returncode == 2
    text = refused.stderr.decode()
    assert "2 line(s) of" in text and "answers another request" in text
    assert "line 3 ('req-0002') differs" in text and "line 8 ('req-0007') differs" in text
    assert "--rerun-changed" in text
    assert line_count(output) == len(ids)


async def test_rerun_changed_runs_them_and_their_new_lines_supersede_the_old(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 12)
    async with MockServer(MockConfig()) as server:
        assert (await run(source, output, "--base-url", server.base_url)).returncode == 0
        old = input_hashes(source)
        change_lines(source, [3, 8])
        again = await run(source, output, "--base-url", server.base_url, "--rerun-changed")
        assert server.stats()["requests"] == len(ids) + 2
    assert again.returncode == 0, again.stderr.decode()
    assert "2 changed request(s) ran again" in summary(again.stderr)["message"]
    new = input_hashes(source)
    last = {r["custom_id"]: r["scheduler"]["request_hash"] for r in read_output(output)}  # the last line wins
    assert last == new
    lines_of = id_counts(output)
    assert lines_of["req-0002"] == lines_of["req-0007"] == 2 and sum(lines_of.values()) == len(ids) + 2
    assert old["req-0002"] != new["req-0002"]


async def test_an_output_without_request_hashes_is_resumed_unchecked_and_said_so(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 6)
    async with MockServer(MockConfig()) as server:
        assert (await run(source, output, "--base-url", server.base_url)).returncode == 0
        older = []
        for record in read_output(output):
            del record["scheduler"]["request_hash"]  # as an older version wrote them
            older.append(orjson.dumps(record))
        output.write_bytes(b"\n".join(older) + b"\n")
        again = await run(source, output, "--base-url", server.base_url)
        assert server.stats()["requests"] == len(ids)
    assert again.returncode == 0, again.stderr.decode()
    assert "6 earlier result(s) carry no request hash" in summary(again.stderr)["message"]


async def test_a_second_ctrl_c_stops_at_once_and_leaves_whole_lines(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 200)
    async with MockServer(MockConfig(latency_ms=200)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "8")

        def twice() -> None:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGINT)

        async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                                            env=env()) as process:
            pid = process.pid
            with anyio.fail_after(30):
                while line_count(output) < 8:
                    await anyio.sleep(0.01)
                twice()
                code = await process.wait()
    assert code == 130
    assert_whole_lines(output)
