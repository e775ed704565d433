"""Configuration, read once from the environment and then served from ``@lru_cache``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 10
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """What the example app is told by its environment.

    ``database_url`` unset means: start a throwaway PostgreSQL for this process.
    """

    database_url: str | None
    upstream_url: str
    log_file: str | None
    log_level: str
    enable_blocking: bool
    slow_report_rate: float
    user_cache_size: int
    user_cache_ttl_s: float
    upstream_timeout_s: float
    password_iterations: int


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        msg = f"{name} must be a number, got {raw!r}."
        raise ValueError(msg) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process; the environment is read on the first call only."""
    return Settings(
        database_url=os.environ.get("DATABASE_URL") or None,
        upstream_url=os.environ.get("EXAMPLE_UPSTREAM_URL", "http://127.0.0.1:8001").rstrip("/"),
        log_file=os.environ.get("EXAMPLE_LOG_FILE") or None,
        log_level=os.environ.get("EXAMPLE_LOG_LEVEL", "INFO"),
        enable_blocking=_flag("EXAMPLE_ENABLE_BLOCKING"),
        slow_report_rate=_number("EXAMPLE_SLOW_REPORT_RATE", 0.05),
        user_cache_size=int(_number("EXAMPLE_USER_CACHE_SIZE", 10_000)),
        user_cache_ttl_s=_number("EXAMPLE_USER_CACHE_TTL", 300.0),
        upstream_timeout_s=_number("EXAMPLE_UPSTREAM_TIMEOUT", 5.0),
        password_iterations=int(_number("EXAMPLE_PASSWORD_ITERATIONS", 100_000)),
    )
