"""Metric families shared per registry, so every component can register into the same one."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

T = TypeVar("T")

_families: weakref.WeakKeyDictionary[CollectorRegistry, dict[tuple[str, ...], Any]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.RLock()  # builders may call shared() for the families they use


def resolve_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """The registry to use: the one given, else prometheus-client's default."""
    return REGISTRY if registry is None else registry


def resolve_namespace(namespace: str | None) -> str:
    """The metric name prefix: the one given, else ``PERFMON_NAMESPACE``, else none."""
    value = os.environ.get("PERFMON_NAMESPACE", "") if namespace is None else namespace
    if value and not value.replace("_", "a").isalnum():
        msg = f"The metric namespace {value!r} must contain only letters, digits and underscores."
        raise ValueError(msg)
    return value


def metric_name(namespace: str, name: str) -> str:
    """``name`` prefixed by ``namespace`` the way prometheus-client does it."""
    return f"{namespace}_{name}" if namespace else name


def shared(registry: CollectorRegistry, key: tuple[str, ...], build: Callable[[], T]) -> T:
    """Return the object stored under ``key`` for ``registry``, building it on first use.

    prometheus-client refuses to register a metric name twice in one registry, while an
    application may build several middlewares, decorators and pools over its lifetime (and a
    test suite many apps). Families are therefore created once per registry and shared.
    """
    with _lock:
        per_registry = _families.setdefault(registry, {})
        if key not in per_registry:
            per_registry[key] = build()
        return per_registry[key]  # type: ignore[no-any-return]


def shared_matching(
    registry: CollectorRegistry,
    key: tuple[str, ...],
    build: Callable[[], T],
    *,
    matches: Callable[[T], bool],
    conflict: str,
) -> T:
    """Like :func:`shared`, but raise ``ValueError(conflict)`` unless the shared object
    ``matches`` the options of the caller (e.g. its buckets)."""
    value = shared(registry, key, build)
    if not matches(value):
        raise ValueError(conflict)
    return value
