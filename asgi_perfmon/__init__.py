"""Prometheus metrics, request ids and slow-request logs for ASGI applications."""

from __future__ import annotations

from asgi_perfmon.context import RequestContext, current_request

__version__ = "0.1.0"

__all__ = [
    "RequestContext",
    "__version__",
    "current_request",
]
