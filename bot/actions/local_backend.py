"""Local stand-ins for the Kubernetes actions, for machines without a cluster.

`LocalJobAction` runs a kubernetes_job task's command and args as a local process, with
the task's env plus the callback variables, and captures its output live. The image is
ignored, and the attempt log states that. `LocalDeploymentAction` records
kubernetes_deployment updates (images, replicas, env, the previous record, a revision)
in a JSON file instead of changing a cluster.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bot.actions.base import AttemptContext, AttemptResult, refuse_untrusted
from bot.actions.kubernetes_deployment import (
    DeploymentArguments,
    checked_deployment_arguments,
)
from bot.actions.kubernetes_job import (
    ArgumentError,
    JobArguments,
    log_ids,
    parse_job_arguments,
    run_to_end,
)
from bot.config import Settings
from bot.store.text import clean_text

log = logging.getLogger(__name__)

# Variables a local command inherits from KubeCI's environment; nothing else leaks in
# (KubeCI's own secrets and DATABASE_URL stay out).
INHERITED_ENV: Final = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
# Output is read, and a line without a line break is logged, in pieces of this size.
CHUNK_BYTES: Final = 64 * 1024


# --- Jobs ----------------------------------------------------------------------------


def local_command(args: JobArguments) -> tuple[list[str], dict[str, str], str]:
    """Return the argv, env and image of the job's (first) container.

    Raises ArgumentError when there is no command: an image's own entrypoint cannot
    run without a container runtime.
    """
    if args.manifest is None:
        argv, env, image = args.command + args.args, {}, args.image
    else:
        container = args.manifest["spec"]["template"]["spec"]["containers"][0]
        argv = [str(part) for part in (container.get("command") or [])]
        argv += [str(part) for part in (container.get("args") or [])]
        env = {
            str(item["name"]): str(item["value"])
            for item in container.get("env") or []
            if "value" in item
        }
        image = str(container.get("image", ""))
    if not argv:
        raise ArgumentError(
            "the local backend needs a command: it cannot run an image's default "
            "entrypoint without a container runtime; give command (and args)"
        )
    return argv, {**env, **args.env}, image


class _OutputLog:
    """Appends one output stream to the attempt log, line by line, up to a size cap.

    The stream is read to its end even past the cap or after a failed log write, so the
    command does not stall on a full pipe. Output past the cap, or after a failed write,
    is dropped.
    """

    def __init__(self, ctx: AttemptContext, source: str, cap_bytes: int) -> None:
        self.ctx = ctx
        self.source = source
        self.cap_bytes = cap_bytes
        self.sent_bytes = 0
        self.truncated = False
        self.write_failed = False
        self.tail = ""
        self._pending = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    async def pump(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(CHUNK_BYTES):
            self._pending += chunk
            cut = self._pending.rfind(b"\n") + 1
            if not cut and len(self._pending) >= CHUNK_BYTES:
                cut = len(self._pending)  # a long line without a line break
            if cut:
                await self._send(self._pending[:cut])
                self._pending = self._pending[cut:]
        await self._send(self._pending, final=True)
        self._pending = b""

    async def _send(self, data: bytes, final: bool = False) -> None:
        if self.truncated or (not data and not final):
            return
        room = self.cap_bytes - self.sent_bytes
        if len(data) > room:
            data, self.truncated = data[:room], True
        self.sent_bytes += len(data)
        # Postgres text cannot contain NUL, which binary output often has.
        text = clean_text(self._decoder.decode(data, final=final or self.truncated))
        if self.truncated:
            text += f"\n[output cut: longer than {self.cap_bytes} bytes]\n"
        self.tail = (self.tail + text)[-4000:]
        if text and not self.write_failed:
            await self._append(text)

    async def _append(self, text: str) -> None:
        try:
            await self.ctx.append_log(self.source, text)
        except Exception:
            # Storing the log is best effort; the command's outcome does not depend on it.
            self.write_failed = True
            log.warning(
                "cannot store the output of %s; dropping the rest of it",
                self.source,
                exc_info=True,
                extra=log_ids(self.ctx),
            )


async def _read_pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """Attach a StreamReader to the read end of an os.pipe()."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


class LocalJobAction:
    """Runs a kubernetes_job task's command as a local process (see the module docstring)."""

    name = "kubernetes_job"
    uses_callback = True

    def __init__(
        self, settings: Settings, *, log_cap_bytes: int = 1024 * 1024, kill_grace_s: float = 5.0
    ) -> None:
        self.settings = settings
        self.log_cap_bytes = log_cap_bytes
        self.kill_grace_s = kill_grace_s

    def _environment(self, ctx: AttemptContext, task_env: Mapping[str, str]) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(task_env)
        if ctx.callback_url:
            env["KUBECI_CALLBACK_URL"] = ctx.callback_url
        if ctx.callback_token:
            env["KUBECI_CALLBACK_TOKEN"] = ctx.callback_token
        return env

    async def execute(self, ctx: AttemptContext) -> AttemptResult:
        refused = refuse_untrusted(
            ctx,
            "kubernetes_job on the local backend",
            "it would run their code on the KubeCI host; use the kubernetes backend",
        )
        if refused is not None:
            return refused
        try:
            argv, task_env, image = local_command(parse_job_arguments(ctx.arguments))
        except ArgumentError as exc:
            log.info("invalid kubernetes_job arguments: %s", exc, extra=log_ids(ctx))
            return AttemptResult.failure(f"kubernetes_job: {exc}", retryable=False)
        # Mask before quoting: quoting can split a secret (a quote in it) past masking.
        masked_argv = [ctx.mask(part) for part in argv]
        log.info(
            "local backend: running %s as a local process; image %s ignored",
            masked_argv[0],
            image,
            extra=log_ids(ctx),
        )
        await ctx.append_log(
            "kubeci",
            f"Local backend: running {shlex.join(masked_argv)} as a local process. "
            f"The image {image or '(none)'} is ignored.\n",
        )
        with tempfile.TemporaryDirectory(prefix="kubeci-job-") as workdir:
            return await self._run(ctx, argv, self._environment(ctx, task_env), workdir)

    async def _run(
        self, ctx: AttemptContext, argv: list[str], env: dict[str, str], workdir: str
    ) -> AttemptResult:
        # Our own pipes, not asyncio's: in Python 3.11 Process.wait() returns only once
        # asyncio's pipes close, which a background grandchild can delay indefinitely.
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            # ValueError: a NUL byte in an argument or an environment variable.
            os.close(out_read)
            os.close(err_read)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            message = clean_text(ctx.mask(f"cannot start {ctx.mask(argv[0])!r}: {reason}"))
            log.info("local command failed to start: %s", message, extra=log_ids(ctx))
            return AttemptResult.failure(message, retryable=False)
        finally:
            os.close(out_write)
            os.close(err_write)
        streams = [await _read_pipe(out_read), await _read_pipe(err_read)]
        try:
            return await self._follow(ctx, process, [reader for reader, _ in streams])
        finally:
            for _, transport in streams:
                transport.close()

    async def _follow(
        self,
        ctx: AttemptContext,
        process: asyncio.subprocess.Process,
        readers: list[asyncio.StreamReader],
    ) -> AttemptResult:
        outputs = [
            _OutputLog(ctx, "local/stdout", self.log_cap_bytes),
            _OutputLog(ctx, "local/stderr", self.log_cap_bytes),
        ]
        pumps = [
            asyncio.create_task(output.pump(reader))
            for output, reader in zip(outputs, readers, strict=True)
        ]
        timeout_s = max(0.0, ctx.remaining_s)
        try:
            async with asyncio.timeout(timeout_s):
                code = await process.wait()
            # Background processes the command left behind end with it, as in a pod.
            await self._stop(process, pumps)
        except TimeoutError:
            await self._stop(process, pumps)
            log.info("local command timed out after %g s", timeout_s, extra=log_ids(ctx))
            return AttemptResult.failure(f"command timed out after {timeout_s:g} s; killed it")
        except asyncio.CancelledError:
            await run_to_end(self._stop(process, pumps))
            raise
        if code == 0:
            return AttemptResult.success("command exited with code 0")
        excerpt = ctx.mask(outputs[1].tail or outputs[0].tail) or None
        if code < 0:
            message = f"command was killed by signal {signal.Signals(-code).name}"
        else:
            message = f"command exited with code {code}"
        log.info("local command failed: %s", message, extra=log_ids(ctx))
        return AttemptResult.failure(message, response_excerpt=excerpt)

    async def _stop(
        self, process: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]]
    ) -> None:
        """Stop the command's process group: SIGTERM, SIGKILL after a grace period.

        Then wait (at most the grace period) for the output pipes to close, which they do
        once every process of the group has ended.
        """
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.kill_grace_s):
                    await process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        _, pending = await asyncio.wait(pumps, timeout=self.kill_grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    async def cancel(self, ctx: AttemptContext) -> None:
        """Nothing to do: a local process ends with the execution that started it."""
        log.info("local job attempt cancelled; nothing to clean up", extra=log_ids(ctx))


# --- Deployments ---------------------------------------------------------------------


class LocalStateError(Exception):
    """The local deployment records cannot be read or written."""


@dataclass(frozen=True)
class LocalUpdate:
    """The record of one Deployment after an update, and whether anything changed."""

    record: dict[str, Any]
    changed: bool


class LocalDeploymentStore:
    """Deployment records in one JSON file, shared safely by several processes.

    Each update holds an exclusive lock on `<file>.lock` and replaces the file
    atomically (write a temporary file, fsync, rename).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"deployments": {}}
        except OSError as exc:
            raise LocalStateError(f"cannot read {self.path}: {exc}") from exc
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise LocalStateError(
                f"{self.path} is not valid JSON ({exc}); fix it or delete it to start afresh"
            ) from exc
        if not isinstance(state, dict) or not isinstance(state.get("deployments"), dict):
            raise LocalStateError(f"{self.path} has no deployments map; fix it or delete it")
        return state

    def _write(self, state: Mapping[str, Any]) -> None:
        handle, temporary = tempfile.mkstemp(prefix=self.path.name, dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(state, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def apply(self, args: DeploymentArguments) -> LocalUpdate:
        """Record an update; raise LocalStateError when the file is unusable."""
        with self._locked():
            state = self.read()
            key = f"{args.namespace}/{args.name}"
            current = state["deployments"].get(key) or {
                "namespace": args.namespace,
                "name": args.name,
                "images": {},
                "replicas": None,
                "env": {},
                "revision": 0,
            }
            spec = _updated_spec(current, args)
            if spec == _spec_of(current):
                return LocalUpdate(current, changed=False)
            record = {
                **current,
                **spec,
                "revision": int(current["revision"]) + 1,
                "previous": {**_spec_of(current), "revision": current["revision"]},
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            state["deployments"][key] = record
            try:
                self._write(state)
            except OSError as exc:
                raise LocalStateError(f"cannot write {self.path}: {exc}") from exc
            return LocalUpdate(record, changed=True)


def _spec_of(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "images": dict(record.get("images") or {}),
        "replicas": record.get("replicas"),
        "env": dict(record.get("env") or {}),
    }


def _updated_spec(record: Mapping[str, Any], args: DeploymentArguments) -> dict[str, Any]:
    spec = _spec_of(record)
    spec["images"].update(args.images)
    if args.replicas is not None:
        spec["replicas"] = args.replicas
    for name, value in args.env.items():
        if value is None:
            spec["env"].pop(name, None)
        else:
            spec["env"][name] = value
    return spec


class LocalDeploymentAction:
    """Records kubernetes_deployment updates in a local file (see the module docstring)."""

    name = "kubernetes_deployment"
    uses_callback = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        path = settings.local_state_file or str(settings.data_dir / "local-deployments.json")
        self.store = LocalDeploymentStore(Path(path))

    async def execute(self, ctx: AttemptContext) -> AttemptResult:
        args = checked_deployment_arguments(ctx, self.settings)
        if isinstance(args, AttemptResult):
            return args
        where = f"{args.namespace}/{args.name}"
        if "revision" in ctx.data:
            # An earlier execution of this attempt recorded the update already.
            return AttemptResult.success(
                f"local backend: Deployment {where} recorded as revision {ctx.data['revision']}"
            )
        try:
            update = await asyncio.to_thread(self.store.apply, args)
        except LocalStateError as exc:
            log.warning("local deployment update failed: %s", exc, extra=log_ids(ctx))
            return AttemptResult.failure(str(exc), retryable=False)
        revision = update.record["revision"]
        await ctx.save_data({**ctx.data, "revision": revision})
        if update.changed:
            message = f"local backend: recorded Deployment {where} as revision {revision}"
        else:
            message = f"local backend: Deployment {where} already matches: nothing to change"
        message += f" in {self.store.path}; no cluster was changed"
        if args.rollback_on_failure:
            message += (
                " (rollback_on_failure never applies: a local record cannot fail to roll out)"
            )
        log.info("%s", message, extra=log_ids(ctx))
        await ctx.append_log("kubeci", message + "\n")
        return AttemptResult.success(message)

    async def cancel(self, ctx: AttemptContext) -> None:
        """Nothing to do: an update is recorded at once."""
        log.info("local deployment attempt cancelled; nothing to clean up", extra=log_ids(ctx))
