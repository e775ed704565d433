from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests._postgres import postgres_cluster, postgres_dsn

__all__ = ["postgres_cluster", "postgres_dsn"]


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry per test, so counts start at zero."""
    return CollectorRegistry()
