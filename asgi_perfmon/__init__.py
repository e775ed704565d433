"""Prometheus metrics, request ids and slow-request logs for ASGI applications."""

from __future__ import annotations

from asgi_perfmon._version import __version__
from asgi_perfmon.cache import CachedFunction, cached, watch_cache
from asgi_perfmon.context import RequestContext, current_request
from asgi_perfmon.endpoint import MetricsApp, metrics_app, metrics_endpoint
from asgi_perfmon.logconfig import configure_logging
from asgi_perfmon.loop_monitor import LoopMonitor
from asgi_perfmon.middleware import PerfMonMiddleware
from asgi_perfmon.pool import InstrumentedPool, db_operation, instrument_pool
from asgi_perfmon.timing import Timed, timed

__all__ = [
    "CachedFunction",
    "InstrumentedPool",
    "LoopMonitor",
    "MetricsApp",
    "PerfMonMiddleware",
    "RequestContext",
    "Timed",
    "__version__",
    "cached",
    "configure_logging",
    "current_request",
    "db_operation",
    "instrument_pool",
    "metrics_app",
    "metrics_endpoint",
    "timed",
    "watch_cache",
]
