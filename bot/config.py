"""Service configuration, read from environment variables.

Nothing is read at import time: `Settings.from_env()` is called by the entry points,
and tests build `Settings` directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """An environment variable contains a value KubeCI cannot use."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a whole number; set it to e.g. {default}"
        ) from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {default}") from None


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    return tuple(item.strip() for item in raw.split(",") if item.strip())


BACKENDS = ("", "kubernetes", "local")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_data_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kubeci"


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    data_dir: Path = field(default_factory=lambda: default_data_dir(os.environ))
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    worker_id: str = ""
    worker_concurrency: int = 32
    lease_s: float = 30.0
    poll_interval_s: float = 2.0
    max_body_bytes: int = 25 * 1024 * 1024
    github_api_url: str = "https://api.github.com"
    github_webhook_secret: str = ""
    github_token: str = ""
    github_app_id: str = ""
    github_private_key_file: str = ""
    github_bot_login: str = ""
    gitlab_url: str = "https://gitlab.com"
    gitlab_webhook_secret: str = ""
    gitlab_token: str = ""
    gitlab_timeout_s: float = 30.0
    backend: str = ""  # "kubernetes", "local" or "" (choose by the presence of a cluster)
    kube_namespace: str = "default"
    kubeconfig: str = ""
    kube_context: str = ""
    stuck_pod_grace_s: float = 120.0
    local_state_file: str = ""
    secrets: Mapping[str, str] = field(default_factory=dict)
    secrets_dir: str = ""
    outbound_allow: tuple[str, ...] = ()
    outbound_deny: tuple[str, ...] = ()
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def callback_base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{self.host}:{self.port}"

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str, object, str]] = [
            (
                self.worker_concurrency >= 1,
                "KUBECI_WORKER_CONCURRENCY",
                self.worker_concurrency,
                "a whole number >= 1",
            ),
            (self.lease_s > 0, "KUBECI_LEASE_S", self.lease_s, "a number of seconds > 0"),
            (
                self.poll_interval_s > 0,
                "KUBECI_POLL_INTERVAL_S",
                self.poll_interval_s,
                "a number of seconds > 0",
            ),
            (
                self.max_body_bytes > 0,
                "KUBECI_MAX_BODY_BYTES",
                self.max_body_bytes,
                "a number of bytes > 0",
            ),
            (self.backend in BACKENDS, "KUBECI_BACKEND", self.backend, "kubernetes or local"),
            (self.log_format in LOG_FORMATS, "KUBECI_LOG_FORMAT", self.log_format, "text or json"),
            (
                self.log_level.upper() in LOG_LEVELS,
                "KUBECI_LOG_LEVEL",
                self.log_level,
                ", ".join(LOG_LEVELS),
            ),
        ]
        for valid, name, value, expected in checks:
            if not valid:
                raise ConfigError(f"{name}={value!r} is invalid; set it to {expected}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        secrets = {
            key.removeprefix("KUBECI_SECRET_"): value
            for key, value in env.items()
            if key.startswith("KUBECI_SECRET_") and key != "KUBECI_SECRET_"
        }
        data_dir = Path(env["KUBECI_DATA_DIR"]) if env.get("KUBECI_DATA_DIR") else None
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            data_dir=data_dir or default_data_dir(env),
            host=env.get("KUBECI_HOST", "127.0.0.1"),
            port=_int(env, "KUBECI_PORT", 8080),
            public_url=env.get("KUBECI_PUBLIC_URL", ""),
            worker_id=env.get("KUBECI_WORKER_ID", ""),
            worker_concurrency=_int(env, "KUBECI_WORKER_CONCURRENCY", 32),
            lease_s=_float(env, "KUBECI_LEASE_S", 30.0),
            poll_interval_s=_float(env, "KUBECI_POLL_INTERVAL_S", 2.0),
            max_body_bytes=_int(env, "KUBECI_MAX_BODY_BYTES", 25 * 1024 * 1024),
            github_api_url=env.get("KUBECI_GITHUB_API_URL", "https://api.github.com"),
            github_webhook_secret=env.get("KUBECI_GITHUB_WEBHOOK_SECRET", ""),
            github_token=env.get("KUBECI_GITHUB_TOKEN", ""),
            github_app_id=env.get("KUBECI_GITHUB_APP_ID", ""),
            github_private_key_file=env.get("KUBECI_GITHUB_PRIVATE_KEY_FILE", ""),
            github_bot_login=env.get("KUBECI_GITHUB_BOT_LOGIN", ""),
            gitlab_url=env.get("KUBECI_GITLAB_URL", "https://gitlab.com"),
            gitlab_webhook_secret=env.get("KUBECI_GITLAB_WEBHOOK_SECRET", ""),
            gitlab_token=env.get("KUBECI_GITLAB_TOKEN", ""),
            gitlab_timeout_s=_float(env, "KUBECI_GITLAB_TIMEOUT_S", 30.0),
            backend=env.get("KUBECI_BACKEND", ""),
            kube_namespace=env.get("KUBECI_KUBE_NAMESPACE", "default"),
            kubeconfig=env.get("KUBECI_KUBECONFIG", ""),
            kube_context=env.get("KUBECI_KUBE_CONTEXT", ""),
            stuck_pod_grace_s=_float(env, "KUBECI_STUCK_POD_GRACE_S", 120.0),
            local_state_file=env.get("KUBECI_LOCAL_STATE_FILE", ""),
            secrets=secrets,
            secrets_dir=env.get("KUBECI_SECRETS_DIR", ""),
            outbound_allow=_list(env, "KUBECI_OUTBOUND_ALLOW"),
            outbound_deny=_list(env, "KUBECI_OUTBOUND_DENY"),
            log_format=env.get("KUBECI_LOG_FORMAT", "text"),
            log_level=env.get("KUBECI_LOG_LEVEL", "INFO"),
        )
