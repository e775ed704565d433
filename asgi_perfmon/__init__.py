"""Prometheus metrics, request ids and slow-request logs for ASGI applications."""

from __future__ import annotations

from asgi_perfmon._version import __version__
from asgi_perfmon.context import RequestContext, current_request
from asgi_perfmon.endpoint import MetricsApp, metrics_app, metrics_endpoint
from asgi_perfmon.middleware import PerfMonMiddleware

__all__ = [
    "MetricsApp",
    "PerfMonMiddleware",
    "RequestContext",
    "__version__",
    "current_request",
    "metrics_app",
    "metrics_endpoint",
]
