"""User-defined label values for a request: custom metric labels and extra exemplar labels.

Both are callables the user hands to the middleware. They run on every request (labels) or on
every exemplar (exemplar labels), so a failure is logged once per kind, never raised into the
app: the label falls back to ``__error__`` and the exemplar to the request id alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from asgi_perfmon._logging import FailureLog
from asgi_perfmon._types import Scope

LabelValue = str | Callable[[Scope], str | None]
"""A static label value, or a callable computing it from the request's scope."""

ExemplarLabels = Callable[[Scope], Mapping[str, str] | None]
"""Extra exemplar labels (a trace id, say) computed from the scope; None for none."""

LABEL_ERROR = "__error__"
"""The value of a custom label whose callable raised or returned something other than a str."""

MAX_EXEMPLAR_CHARS = 128
"""OpenMetrics limits an exemplar's label names and values to 128 characters in all."""

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED = frozenset(
    {"http_request_method", "http_route", "http_response_status_code", "error_type", "reason"}
)


class RequestLabels:
    """The custom labels of the middleware's request metrics, validated once."""

    def __init__(self, labels: Mapping[str, LabelValue] | None) -> None:
        if labels is None:
            labels = {}
        if not isinstance(labels, Mapping):
            msg = f"labels must be a mapping of label names to values, got {labels!r}."  # type: ignore[unreachable]
            raise ValueError(msg)
        for name, value in labels.items():
            _check_label(name, value)
        self.names: tuple[str, ...] = tuple(labels)
        self._values = tuple(labels.values())
        self._failures = FailureLog()

    def values(self, scope: Scope) -> tuple[str, ...]:
        """The label values for the request of ``scope``."""
        pairs = zip(self.names, self._values, strict=True)
        return tuple(self._value(name, value, scope) for name, value in pairs)

    def _value(self, name: str, value: LabelValue, scope: Scope) -> str:
        if isinstance(value, str):
            return value
        try:
            computed: object = value(scope)
        except Exception as error:
            self._failures.record("label_callback", error, label=name)
            return LABEL_ERROR
        if computed is None:
            return ""
        if not isinstance(computed, str):
            wrong_type = TypeError(f"returned {type(computed).__name__}, not str")
            self._failures.record("label_callback", wrong_type, label=name)
            return LABEL_ERROR
        return computed


class ExemplarLabeller:
    """The labels of one exemplar: the user's extra labels, then the request id if it fits."""

    def __init__(self, extra: ExemplarLabels | None) -> None:
        if extra is not None and not callable(extra):
            msg = f"exemplar_labels must be a callable taking the scope, got {extra!r}."  # type: ignore[unreachable]
            raise ValueError(msg)
        self._extra = extra
        self._failures = FailureLog()

    def labels(self, scope: Scope, request_id: str) -> dict[str, str] | None:
        """The exemplar's labels, or None when not even the request id fits."""
        labels = self._extra_labels(scope)
        if _size(labels) + len("request_id") + len(request_id) <= MAX_EXEMPLAR_CHARS:
            labels["request_id"] = request_id
        return labels or None

    def _extra_labels(self, scope: Scope) -> dict[str, str]:
        if self._extra is None:
            return {}
        try:
            extra = self._extra(scope)
            labels = {} if extra is None else dict(extra)
            for name, value in labels.items():
                if not (isinstance(name, str) and _LABEL_NAME.fullmatch(name)):
                    raise ValueError(f"invalid exemplar label name {name!r}")
                if not isinstance(value, str):
                    raise TypeError(f"exemplar label {name!r} is {type(value).__name__}, not str")
            if _size(labels) > MAX_EXEMPLAR_CHARS:
                raise ValueError(f"exemplar labels over {MAX_EXEMPLAR_CHARS} characters")
        except Exception as error:
            self._failures.record("exemplar_callback", error)
            return {}
        return labels


def _size(labels: dict[str, str]) -> int:
    """Characters of label names and values, as OpenMetrics counts them for its limit."""
    return sum(len(name) + len(value) for name, value in labels.items())


def _check_label(name: object, value: object) -> None:
    if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
        msg = f"Custom label names must be valid Prometheus label names, got {name!r}."
        raise ValueError(msg)
    if name in _RESERVED or name == "le":
        msg = f"The custom label {name!r} clashes with a label asgi-perfmon sets itself."
        raise ValueError(msg)
    if not isinstance(value, str) and not callable(value):
        msg = f"The custom label {name!r} must be a str or a callable taking the scope."
        raise ValueError(msg)
