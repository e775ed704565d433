"""Invalid configuration fails at construction with a clear sentence."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from asgi_perfmon import PerfMonMiddleware, metrics_app


async def app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"slow_request_threshold": 0}, "slow_request_threshold must be a positive number"),
        ({"slow_request_threshold": -1.5}, "slow_request_threshold must be a positive number"),
        ({"slow_request_threshold": "1"}, "slow_request_threshold must be a positive number"),
        ({"buckets": []}, "buckets must be positive, strictly increasing"),
        ({"buckets": [1.0, 0.5]}, "buckets must be positive, strictly increasing"),
        ({"buckets": [0, 1]}, "buckets must be positive, strictly increasing"),
        ({"max_label_values": 0}, "max_label_values must be a positive integer"),
        ({"max_label_values": True}, "max_label_values must be a positive integer"),
        ({"exclude_paths": "/metrics"}, "exclude_paths must be a collection"),
        ({"exclude_paths": ["metrics"]}, "starting with '/'"),
        ({"request_id_header": "X Bad\r\n"}, "request_id_header must be a valid HTTP header name"),
        ({"request_id_header": ""}, "request_id_header must be a valid HTTP header name"),
        ({"namespace": "my-app"}, "namespace 'my-app' must contain only letters"),
    ],
)
def test_invalid_options_raise_value_error(
    registry: CollectorRegistry, options: dict[str, Any], message: str
) -> None:
    """Each invalid option is refused when the middleware is built."""
    with pytest.raises(ValueError, match=message):
        PerfMonMiddleware(app, registry=registry, **options)


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        (
            "PERFMON_SLOW_REQUEST_THRESHOLD",
            "soon",
            "PERFMON_SLOW_REQUEST_THRESHOLD must be a number",
        ),
        ("PERFMON_SLOW_REQUEST_THRESHOLD", "-2", "slow_request_threshold must be a positive"),
        ("PERFMON_MAX_LABEL_VALUES", "many", "PERFMON_MAX_LABEL_VALUES must be a positive integer"),
        ("PERFMON_NAMESPACE", "a b", "must contain only letters"),
    ],
)
def test_invalid_environment_raises_value_error(
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    raw: str,
    message: str,
) -> None:
    """Environment variables are validated like arguments."""
    monkeypatch.setenv(variable, raw)

    with pytest.raises(ValueError, match=message):
        PerfMonMiddleware(app, registry=registry)


def test_environment_supplies_defaults(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PERFMON_NAMESPACE`` prefixes every metric; ``PERFMON_SLOW_REQUEST_THRESHOLD`` is read."""
    monkeypatch.setenv("PERFMON_NAMESPACE", "shop")
    monkeypatch.setenv("PERFMON_SLOW_REQUEST_THRESHOLD", "2.5")

    middleware = PerfMonMiddleware(app, registry=registry)

    assert middleware._slow_threshold == 2.5
    names = {family.name for family in registry.collect()}
    assert "shop_http_server_request_duration_seconds" in names
    assert not any(name.startswith("http_") for name in names)


def test_explicit_arguments_win_over_the_environment(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An argument overrides the environment variable."""
    monkeypatch.setenv("PERFMON_SLOW_REQUEST_THRESHOLD", "9")

    assert (
        PerfMonMiddleware(app, registry=registry, slow_request_threshold=0.5)._slow_threshold == 0.5
    )


def test_conflicting_options_on_a_shared_registry(registry: CollectorRegistry) -> None:
    """Two middlewares with different buckets on one registry: a clear error, not a silent mix."""
    PerfMonMiddleware(app, registry=registry)

    with pytest.raises(ValueError, match="already holds the asgi-perfmon HTTP metrics"):
        PerfMonMiddleware(app, registry=registry, buckets=[0.1, 1.0])


@pytest.mark.parametrize("token", ["", "   "])
def test_empty_metrics_token_is_refused(token: str) -> None:
    """An empty bearer token would lock nobody out: refused."""
    with pytest.raises(ValueError, match="token must be a non-empty string"):
        metrics_app(token=token)
