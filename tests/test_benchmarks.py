"""The benchmark runs end to end (``python -m benchmarks --smoke``); no speed is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("inprocess", "http", "scrape", "cardinality", "pool_cache")
SCENARIOS = (
    "GET /items/{item_id}",
    "POST /orders (JSON body)",
    "GET 404 (unmatched)",
    "GET /stream (streaming)",
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    output = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((output / "smoke.json").read_text())
    return results, (output / "smoke.md").read_text(), output


@pytest.mark.slow
@pytest.mark.uvicorn
def test_every_section_ran(smoke_run: tuple[dict[str, Any], str, Path]) -> None:
    results, markdown, _ = smoke_run
    assert set(SECTIONS) <= set(results["sections"])
    assert results["machine"]["mode"] == "smoke"
    assert _number(results["machine"]["cores"])
    assert results["machine"]["cpu"]
    for heading in ("## 1. In-process", "## 2. Over HTTP", "## 3. `/metrics`", "## 4. Cardinality",
                    "## 5. Pool and cache", "## Targets"):  # fmt: skip
        assert heading in markdown


@pytest.mark.slow
@pytest.mark.uvicorn
def test_inprocess_figures(smoke_run: tuple[dict[str, Any], str, Path]) -> None:
    results, _, output = smoke_run
    scenarios = results["sections"]["inprocess"]["scenarios"]
    assert set(SCENARIOS) == set(scenarios)
    for rows in scenarios.values():
        assert {"bare", "noop-asgi", "asgi-perfmon"} <= set(rows)
        for row in rows.values():
            for field in ("median", "p25", "p75", "min", "overhead", "ratio"):
                assert _number(row[field]), (field, row)
        assert rows["bare"]["ratio"] == 1.0
    assert results["sections"]["inprocess"]["checks"]["asgi-perfmon"]["labels_route_template"]
    if results["chart"]:
        assert (output / results["chart"]).stat().st_size > 1000
    else:
        assert results["chart_note"]


@pytest.mark.slow
@pytest.mark.uvicorn
def test_http_scrape_and_cardinality_figures(
    smoke_run: tuple[dict[str, Any], str, Path],
) -> None:
    sections = smoke_run[0]["sections"]
    http = sections["http"]["variants"]
    assert http["bare"]["rps_ratio"] == 1.0
    for row in http.values():
        assert row["requests_per_s"] > 0
        assert _number(row["p99_ms"])
        assert row["errors"] == 0
    scrape = sections["scrape"]["sizes"]["10k_series"]["asgi-perfmon"]
    assert scrape["series"] > 5000
    for field in ("render_ms_median", "stall_ms_max", "idle_stall_ms_max", "bytes_sent"):
        assert _number(scrape[field])
    assert scrape["openmetrics"]
    cardinality = sections["cardinality"]["variants"]["asgi-perfmon"]
    assert _number(cardinality["rss_growth_bytes"])
    assert cardinality["series_growth"] == 0


@pytest.mark.slow
@pytest.mark.uvicorn
def test_targets_and_pool_section(smoke_run: tuple[dict[str, Any], str, Path]) -> None:
    results, _, output = smoke_run
    targets = {row["target"]: row for row in results["targets"]}
    assert len(targets) == 5 if "prometheus-fastapi-instrumentator" in results["variants"] else 4
    for row in targets.values():
        assert row["met"] in (True, False)
    pool = results["sections"]["pool_cache"]
    assert pool["status"] in ("ok", "missing", "failed")
    if pool["status"] == "ok":
        assert (output / "pool_cache.json").exists()
