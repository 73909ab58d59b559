"""Regression tests for faults in the engine, callbacks, actions, outbox and `kubeci run`.

Each test states the behaviour users should see. A test marked `xfail(strict=True)` shows
a fault that is still open. It fails today, and the fix removes the mark.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from bot.actions.registry import build_actions
from bot.cli import main as cli_main
from bot.cli.run import run_command
from bot.engine.core import RunRequest
from bot.engine.worker import Worker
from bot.notifiers import notifier_sinks
from bot.outbox.sender import OutboxSender
from bot.store.embedded import EmbeddedPostgres
from pipelines_schema.loader import PipelineError, load_pipeline
from tests.fakes.target import Callback, FakeTarget, Reply
from tests.harness import FAST_RETRY, Harness, fast_settings, running_core

SECRET = 'p\u00e4ss"w0rd-tok'


@pytest.fixture
async def core(db: asyncpg.Pool, database_dsn: str) -> AsyncIterator[Harness]:
    async with running_core(db, fast_settings(database_dsn, lease_s=1.0)) as harness:
        yield harness


def one_task(path: str, extra: str = "", arguments: str = "") -> str:
    """A pipeline with one webhook task `call` that calls `path` on the `target` label."""
    return (
        "jobs:\n  - name: build\n    steps:\n      - name: only\n        tasks:\n"
        "          - name: call\n            action: webhook\n"
        + extra
        + "            arguments:\n"
        + f'              url: "${{labels.target}}{path}"\n'
        + arguments
    )


def target_labels(target: FakeTarget) -> dict[str, str]:
    return {"target": target.base_url}


ASYNC = "              mode: async\n"


async def _parked_callback_url(core: Harness, run_id: int, target: FakeTarget) -> str:
    async with asyncio.timeout(10.0):
        while [a["state"] for a in await core.attempts(run_id, "call")] != ["waiting"]:
            await asyncio.sleep(0.05)
    return target.received("/async")[0].headers["X-KubeCI-Callback-URL"]


class FlakyPool:
    """An asyncpg pool whose `acquire` raises `error` while `failing` is set.

    It simulates a database connection that breaks under the caller, as
    `pg_terminate_backend` or a Postgres restart does.
    """

    def __init__(self, pool: asyncpg.Pool, error: Exception) -> None:
        self._pool = pool
        self.error = error
        self.failing = False

    def acquire(self) -> Any:
        if self.failing:
            raise self.error
        return self._pool.acquire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def _fail_for(pool: FlakyPool, seconds: float) -> None:
    pool.failing = True
    await asyncio.sleep(seconds)
    pool.failing = False


# ---- delays the database cannot store ----------------------------------------------------


async def test_retry_after_huge_sends_once(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/busy", Reply(status=503, headers={"Retry-After": "99999999999999"}))
    run_id = await core.start_run(
        one_task("/busy", extra="            retries: 1\n"), target_labels(fake_target)
    )
    await asyncio.sleep(3.0)
    assert len(fake_target.received("/busy")) == 1
    attempts = await core.attempts(run_id, "call")
    assert attempts[0]["state"] == "failed"


async def test_backoff_huge_factor_records(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/down", Reply(status=500))
    extra = (
        "            retries: 3\n"
        "            backoff: {initial_s: 0.01, factor: 1.0e+200, max_s: 0.05}\n"
    )
    run_id = await core.start_run(one_task("/down", extra=extra), target_labels(fake_target))
    assert await core.wait_run(run_id, timeout_s=4.0) == "failed"
    assert len(fake_target.received("/down")) == 4


async def test_backoff_huge_initial_page(core: Harness, fake_target: FakeTarget) -> None:
    # asyncpg cannot turn a timestamp after year 9999 into a Python datetime.
    fake_target.script("/down", Reply(status=500))
    extra = "            retries: 1\n            backoff: {initial_s: 1.0e+12, max_s: 1.0e+12}\n"
    run_id = await core.start_run(one_task("/down", extra=extra), target_labels(fake_target))
    async with asyncio.timeout(5.0):
        while await core.pool.fetchval("SELECT count(*) FROM attempts") < 2:
            await asyncio.sleep(0.05)
    async with (
        aiohttp.ClientSession() as session,
        session.get(core.engine.run_url(run_id)) as response,
    ):
        status = response.status
    assert status == 200


# ---- NUL characters, which Postgres text and jsonb reject --------------------------------


async def test_nul_in_response_is_recorded(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/binary", Reply(status=200, body=b"\x89PNG\r\n\x1a\n\x00\x00"))
    run_id = await core.start_run(one_task("/binary"), target_labels(fake_target))
    assert await core.wait_run(run_id, timeout_s=5.0) == "succeeded"
    assert len(fake_target.received("/binary")) == 1


NUL_PIPELINE = (
    "jobs:\n  - name: build\n    steps:\n      - name: only\n        tasks:\n"
    "          - name: call\n            action: webhook\n"
    '            arguments: {url: "http://127.0.0.1:9/", body: "a\\0b"}\n'
)


async def test_nul_in_pipeline_is_reported(db: asyncpg.Pool, database_dsn: str) -> None:
    # The loader may report the value, or the run may store it. Both are fine.
    try:
        pipeline = load_pipeline(NUL_PIPELINE)
    except PipelineError as error:
        assert "arguments.body" in str(error)
        return
    settings = fast_settings(database_dsn)
    async with (
        running_core(db, settings, start_worker=False) as core,
        db.acquire() as conn,
        conn.transaction(),
    ):
        run_id = await core.engine.create_run(conn, RunRequest(pipeline=pipeline, labels={}))
    assert run_id > 0


async def test_callback_nul_message_accepted(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202))
    run_id = await core.start_run(one_task("/async", arguments=ASYNC), target_labels(fake_target))
    url = await _parked_callback_url(core, run_id, fake_target)
    body = b'{"status": "failed", "message": "bad\\u0000byte"}'
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as response:
        status = response.status
    assert status in (200, 400)


async def test_notifier_nul_error_is_recorded(core: Harness, fake_target: FakeTarget) -> None:
    # Every answer fails, so the row ends dead with the last error, after the set attempts.
    fake_target.script("/hook", Reply(status=500, body=b"oops\x00"))
    notifier = (
        "    notifiers:\n"
        '      - {name: n, type: webhook, url: "${labels.target}/hook", events: [started]}\n'
    )
    text = one_task("/ok").replace("  - name: build\n", "  - name: build\n" + notifier)
    run_id = await core.start_run(text, target_labels(fake_target))
    assert await core.wait_run(run_id) == "succeeded"
    async with asyncio.timeout(5.0):
        while await core.pool.fetchval("SELECT state FROM outbox") == "pending":
            await asyncio.sleep(0.05)
    error = await core.pool.fetchval("SELECT last_error FROM outbox")
    assert error is not None
    assert "500" in error
    assert len(fake_target.received("/hook")) == FAST_RETRY.max_attempts


async def test_local_nul_output_is_logged(
    db: asyncpg.Pool, database_dsn: str, tmp_path: Path
) -> None:
    code = (
        "import sys; sys.stdout.write('a' + chr(0) + 'b' + chr(10)); sys.stdout.flush();"
        " [print('line', i, 'x' * 60) for i in range(5000)]"
    )
    text = (
        "jobs:\n  - name: build\n    steps:\n      - name: only\n        tasks:\n"
        "          - name: call\n            action: kubernetes_job\n            timeout_s: 10\n"
        f'            arguments: {{image: python, command: ["{sys.executable}", -c, "{code}"]}}\n'
    )
    settings = fast_settings(database_dsn, backend="local", data_dir=tmp_path)
    async with running_core(db, settings) as core:
        run_id = await core.start_run(text, {})
        assert await core.wait_run(run_id, timeout_s=15.0) == "succeeded"
    # The output is about 350 KB, more than the pipe and the stream reader buffer contain.
    logs = await db.fetchval("SELECT string_agg(content, '') FROM logs")
    assert "line 4999 x" in logs


# ---- callbacks --------------------------------------------------------------------------


async def test_callback_deep_json_rejected(core: Harness, fake_target: FakeTarget) -> None:
    fake_target.script("/async", Reply(status=202))
    run_id = await core.start_run(one_task("/async", arguments=ASYNC), target_labels(fake_target))
    url = await _parked_callback_url(core, run_id, fake_target)
    async with aiohttp.ClientSession() as session, session.post(url, data=b"[" * 60000) as response:
        status = response.status
    assert status == 400


async def test_callback_after_timeout_rejected(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    fake_target.script("/async", Reply(status=202))
    settings = fast_settings(database_dsn, lease_s=1.0, poll_interval_s=5.0)
    async with running_core(db, settings) as core:
        extra = "            timeout_s: 0.5\n"
        run_id = await core.start_run(
            one_task("/async", extra=extra, arguments=ASYNC), target_labels(fake_target)
        )
        url = await _parked_callback_url(core, run_id, fake_target)
        await asyncio.sleep(1.0)
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json={"status": "succeeded"}) as response,
        ):
            status = response.status
        task = await core.state("tasks", run_id, "call")
    assert status == 404
    assert task["state"] != "succeeded"


# ---- recovery and lost connections -------------------------------------------------------


async def test_cancelled_attempt_not_rerun(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    # A worker claimed the attempt and died; the run is cancelled before its lease expires.
    settings = fast_settings(database_dsn, lease_s=1.0)
    async with running_core(db, settings, start_worker=False) as core:
        run_id = await core.start_run(one_task("/work"), target_labels(fake_target))
        await db.execute(
            "UPDATE attempts SET state = 'running', lease_owner = 'dead-worker',"
            " lease_expires_at = now() + interval '0.5 second', started_at = now(),"
            " deadline_at = now() + interval '1 hour'"
        )
        async with db.acquire() as conn, conn.transaction():
            await core.engine.cancel_run(conn, run_id, reason="stopped by a test")
        await core.services.start_background()
        await asyncio.sleep(2.0)
    assert fake_target.received("/work") == []


@pytest.fixture
def broken_connection() -> Exception:
    # What asyncpg 0.30 raises on a connection whose backend was terminated mid-query.
    return asyncpg.exceptions.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress"
    )


async def test_worker_survives_broken_connection(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget, broken_connection: Exception
) -> None:
    settings = fast_settings(database_dsn, lease_s=1.0)
    flaky = FlakyPool(db, broken_connection)
    async with running_core(db, settings, start_worker=False) as core:
        worker = Worker(
            flaky,  # type: ignore[arg-type]
            core.engine,
            build_actions(settings),
            core.services.secrets,
            lease_s=1.0,
            poll_interval_s=0.05,
        )
        loop = asyncio.create_task(worker.run())
        try:
            await asyncio.sleep(0.2)
            await _fail_for(flaky, 0.3)
            run_id = await core.start_run(one_task("/a"), target_labels(fake_target))
            state = await core.wait_run(run_id, timeout_s=5.0)
        finally:
            await worker.stop(grace_s=0.5)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    assert state == "succeeded"


async def test_sender_survives_broken_connection(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget, broken_connection: Exception
) -> None:
    settings = fast_settings(database_dsn, lease_s=1.0)
    flaky = FlakyPool(db, broken_connection)
    notifier = (
        "    notifiers:\n"
        '      - {name: n, type: webhook, url: "${labels.target}/hook", events: [started]}\n'
    )
    text = one_task("/ok").replace("  - name: build\n", "  - name: build\n" + notifier)
    async with running_core(db, settings, start_worker=False) as core:
        sender = OutboxSender(
            flaky,  # type: ignore[arg-type]
            notifier_sinks(settings, secrets=core.services.secrets),
            "flaky-sender",
            retry=FAST_RETRY,
            poll_interval_s=0.05,
        )
        loops = [asyncio.create_task(sender.run()), asyncio.create_task(core.services.worker.run())]
        try:
            await asyncio.sleep(0.2)
            await _fail_for(flaky, 0.3)
            run_id = await core.start_run(text, target_labels(fake_target))
            assert await core.wait_run(run_id) == "succeeded"
            await asyncio.sleep(1.0)
        finally:
            sender.stop()
            await core.services.worker.stop(grace_s=0.5)
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
    assert len(fake_target.received("/hook")) == 1


async def test_log_write_failure_keeps_outcome(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    # The database refuses connections (a restart) while the target is answering.
    fake_target.script("/slow", Reply(status=200, delay_s=0.3))
    settings = fast_settings(database_dsn, lease_s=3.0)
    flaky = FlakyPool(db, ConnectionRefusedError(111, "Connection refused"))
    async with running_core(db, settings, start_worker=False) as core:
        worker = Worker(
            flaky,  # type: ignore[arg-type]
            core.engine,
            build_actions(settings),
            core.services.secrets,
            lease_s=3.0,
            poll_interval_s=0.05,
        )
        loop = asyncio.create_task(worker.run())
        try:
            run_id = await core.start_run(one_task("/slow"), target_labels(fake_target))
            async with asyncio.timeout(5.0):
                while not fake_target.received("/slow"):
                    await asyncio.sleep(0.01)
            await _fail_for(flaky, 1.0)
            state = await core.wait_run(run_id, timeout_s=10.0)
        finally:
            await worker.stop(grace_s=0.5)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    assert state == "succeeded"
    assert len(fake_target.received("/slow")) == 1


# ---- secrets ----------------------------------------------------------------------------


async def test_callback_message_is_masked(
    db: asyncpg.Pool, database_dsn: str, fake_target: FakeTarget
) -> None:
    reply = Reply(status=202, callback=Callback("failed", f"token {SECRET} was rejected"))
    fake_target.script("/async", reply)
    arguments = ASYNC + '              headers: {Authorization: "Bearer ${secrets.TOK}"}\n'
    settings = fast_settings(database_dsn, secrets={"TOK": SECRET})
    async with running_core(db, settings) as core:
        run_id = await core.start_run(
            one_task("/async", arguments=arguments), target_labels(fake_target)
        )
        assert await core.wait_run(run_id) == "failed"
    for table, column in (("attempts", "message"), ("tasks", "message"), ("events", "payload")):
        leaked = await db.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column}::text LIKE '%' || $1 || '%'", "w0rd-tok"
        )
        assert leaked == 0, f"{table}.{column} holds the secret"


@pytest.fixture
async def echo_target() -> AsyncIterator[str]:
    """A target that answers with the JSON-encoded request body, as many APIs do on error."""

    async def echo(request: web.Request) -> web.Response:
        body = (await request.read()).decode("utf-8")
        return web.json_response({"received": body}, status=202)

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _echo_run(db: asyncpg.Pool, database_dsn: str, base_url: str, arguments: str) -> str:
    settings = fast_settings(database_dsn, secrets={"TOK": SECRET})
    async with running_core(db, settings) as core:
        text = one_task("/echo", extra="            timeout_s: 0.5\n", arguments=arguments)
        run_id = await core.start_run(text, {"target": base_url})
        await core.wait_run(run_id)
    return str(await db.fetchval("SELECT response_excerpt FROM attempts"))


async def test_echoed_secret_is_masked(
    db: asyncpg.Pool, database_dsn: str, echo_target: str
) -> None:
    arguments = '              body: {token: "${secrets.TOK}"}\n'
    excerpt = await _echo_run(db, database_dsn, echo_target, arguments)
    assert "w0rd-tok" not in excerpt


async def test_echoed_callback_url_is_hidden(
    db: asyncpg.Pool, database_dsn: str, echo_target: str
) -> None:
    arguments = ASYNC + '              body: {callback: "${callback_url}"}\n'
    excerpt = await _echo_run(db, database_dsn, echo_target, arguments)
    assert "/callbacks/" not in excerpt


async def test_local_command_line_is_masked(
    db: asyncpg.Pool, database_dsn: str, tmp_path: Path
) -> None:
    text = (
        "jobs:\n  - name: build\n    steps:\n      - name: only\n        tasks:\n"
        "          - name: call\n            action: kubernetes_job\n"
        '            arguments: {image: busybox, command: ["/bin/true", "${secrets.X}"]}\n'
    )
    settings = fast_settings(
        database_dsn, backend="local", data_dir=tmp_path, secrets={"X": "it's-a-secret"}
    )
    async with running_core(db, settings) as core:
        run_id = await core.start_run(text, {})
        assert await core.wait_run(run_id) == "succeeded"
    logs = await db.fetchval("SELECT string_agg(content, '') FROM logs")
    assert "s-a-secret" not in logs


# ---- rules ------------------------------------------------------------------------------


REGEX_DOS = """
import time
from pipelines_schema.loader import load_pipeline
from pipelines_schema.rules import matches
pipeline = load_pipeline(
    "jobs:\\n  - name: a\\n    rules: {label: branch, regex: '(a+)+b'}\\n    steps:\\n"
    "      - name: s\\n        tasks:\\n"
    "          - {name: t, action: webhook, arguments: {url: 'http://127.0.0.1:9/'}}\\n"
)
matches(pipeline.jobs[0].rules, {"branch": "a" * 40})
"""


def test_rule_regex_cannot_hang() -> None:
    # Either the loader rejects the pattern or matching ends; a hang is the fault.
    root = Path(__file__).resolve().parent.parent
    try:
        subprocess.run([sys.executable, "-c", REGEX_DOS], cwd=root, timeout=5, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("matching a rule regex against a 40-character label ran over 5 s")


# ---- command line -----------------------------------------------------------------------


@pytest.fixture
def dash_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "-pipeline.yml"
    path.write_text(one_task("/x").replace("${labels.target}", "http://127.0.0.1:9"))
    yield path


def test_validate_dash_file_name(dash_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(dash_file.parent)
    assert cli_main(["validate", "--", dash_file.name]) == 0


def test_run_non_utf8_label(db: asyncpg.Pool, database_dsn: str, dash_file: Path) -> None:
    settings = fast_settings(database_dsn)
    label = "branch=" + b"\xff".decode("utf-8", "surrogateescape")
    assert run_command(settings, str(dash_file), [label], [], 10.0) == 2


@pytest.mark.slow
def test_embedded_server_outlives_first_user() -> None:
    # A folder every user can reach, so that a root test run keeps the data in it.
    folder = Path(tempfile.mkdtemp(prefix="kubeci-break-"))
    folder.chmod(0o755)
    first = EmbeddedPostgres(folder / "postgres")
    second = EmbeddedPostgres(folder / "postgres")
    assert first.data_dir == folder / "postgres"
    dsn = first.start()
    try:
        assert second.start() == dsn
        first.stop()

        async def connect() -> None:
            conn = await asyncpg.connect(dsn, timeout=5)
            await conn.close()

        asyncio.run(connect())
        second.stop()
        assert _running_port_of(folder / "postgres") is None
    finally:
        first.stop()
        second.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _running_port_of(data_dir: Path) -> int | None:
    from bot.store.embedded import _running_port

    return _running_port(data_dir)
