"""Start the demo target on a free local port and run examples/demo.kubeci.yml against it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the demo target did not start at {url}")


def main() -> int:
    port = free_port()
    target = subprocess.Popen([sys.executable, str(HERE / "target.py"), "--port", str(port)])
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ok")
        command = [
            sys.executable,
            "-m",
            "bot",
            "run",
            str(HERE / "demo.kubeci.yml"),
            "--label",
            f"target=http://127.0.0.1:{port}",
        ]
        # The local backend runs kubernetes_job tasks as local processes, even on a
        # machine that has a kubeconfig.
        env = {**os.environ, "KUBECI_BACKEND": "local"}
        return subprocess.call(command, cwd=HERE.parent, env=env)
    finally:
        target.terminate()
        target.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
