"""The issue's targets, checked against one run's figures."""

from __future__ import annotations

from typing import Any

from benchmarks import variants
from benchmarks.inprocess import PARAMETRIZED

OVERHEAD_SHARE = 0.25
OVERHEAD_US = 15.0
HTTP_RPS_SHARE = 0.95
STALL_MS = 5.0
FLAT_RSS_BYTES = 1 << 20
"""RSS growth still called flat: allocator noise, well under one byte per distinct path."""


def _target(name: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "met": met}


def _inprocess(section: dict[str, Any]) -> list[dict[str, Any]]:
    rows = section["scenarios"][PARAMETRIZED]
    ours = rows.get(variants.PERFMON)
    if ours is None:
        return []
    peers = {
        name: row["overhead"]
        for name, row in rows.items()
        if variants.BY_NAME[name].route_template and name != variants.PERFMON
    }
    checks = []
    if peers:
        cheapest = min(peers, key=lambda name: peers[name])
        limit = peers[cheapest] * OVERHEAD_SHARE
        checks.append(
            _target(
                "in-process overhead <= 1/4 of the cheapest route-template peer",
                f"{ours['overhead']:.1f} µs vs {cheapest} {peers[cheapest]:.1f} µs "
                f"(limit {limit:.1f} µs)",
                ours["overhead"] <= limit,
            )
        )
    checks.append(
        _target(
            f"in-process overhead < {OVERHEAD_US:g} µs on {PARAMETRIZED}",
            f"{ours['overhead']:.1f} µs",
            ours["overhead"] < OVERHEAD_US,
        )
    )
    return checks


def _http(section: dict[str, Any]) -> list[dict[str, Any]]:
    ours = section["variants"].get(variants.PERFMON)
    if ours is None:
        return []
    return [
        _target(
            f"over HTTP >= {HTTP_RPS_SHARE:.0%} of the bare app's requests/s",
            f"{ours['rps_ratio']:.1%} ({ours['requests_per_s']:.0f} req/s)",
            ours["rps_ratio"] >= HTTP_RPS_SHARE,
        )
    ]


def _scrape(section: dict[str, Any]) -> list[dict[str, Any]]:
    ours = section["sizes"].get("10k_series", {}).get(variants.PERFMON)
    if ours is None:
        return []
    return [
        _target(
            f"a scrape of ~10,000 series stalls the loop < {STALL_MS:g} ms",
            f"max {ours['stall_ms_max']:.1f} ms, median {ours['stall_ms_median']:.1f} ms "
            f"({ours['series']} series; idle loop max {ours['idle_stall_ms_max']:.1f} ms)",
            ours["stall_ms_max"] < STALL_MS,
        )
    ]


def _cardinality(section: dict[str, Any]) -> list[dict[str, Any]]:
    ours = section["variants"].get(variants.PERFMON)
    if ours is None:
        return []
    growth = ours["rss_growth_bytes"]
    return [
        _target(
            "memory and series flat with distinct raw paths",
            f"{ours['paths_from']:,} -> {ours['paths_to']:,} paths: series "
            f"{ours['series_growth']:+d}, RSS {growth / 1024:+.0f} KiB",
            ours["series_growth"] == 0 and growth <= FLAT_RSS_BYTES,
        )
    ]


def evaluate(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target whose section ran."""
    checks: list[dict[str, Any]] = []
    if "inprocess" in sections:
        checks += _inprocess(sections["inprocess"])
    if "http" in sections and "variants" in sections["http"]:
        checks += _http(sections["http"])
    if "scrape" in sections:
        checks += _scrape(sections["scrape"])
    if "cardinality" in sections:
        checks += _cardinality(sections["cardinality"])
    return checks
