"""The benchmark runs end to end (``python -m benchmarks --smoke``, and a few seconds of the
soak); no speed is asserted."""

from __future__ import annotations

import json
import math
import os
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


@pytest.mark.slow
@pytest.mark.uvicorn
@pytest.mark.postgres
def test_soak_samples_the_server_and_gives_a_verdict(postgres_dsn: str, tmp_path: Path) -> None:
    """A few seconds of the soak (``--only soak``): samples, verdict fields, report, chart."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "soak", "--soak-seconds", "4",
         "--output", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PERFMON_TEST_DSN": postgres_dsn},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((tmp_path / "soak.json").read_text())

    samples = results["samples"]
    assert len(samples) >= 5
    assert [s["t_s"] for s in samples] == sorted({s["t_s"] for s in samples})
    for sample in samples:
        for field in ("rss_bytes", "series", "requests", "server_requests", "errors", "threads"):
            assert _number(sample[field]), (field, sample)
        assert sample["rss_bytes"] > 10 * 1024 * 1024
        assert sample["series"] > 100
    assert samples[-1]["requests"] > samples[0]["requests"]
    assert samples[-1]["hostile_requests"] > 0
    assert {"404", "405"} <= set(results["totals"]["statuses"])

    verdict = results["verdict"]
    for part in ("rss", "series", "errors"):
        assert verdict[part]["pass"] in (True, False)
    assert verdict["pass"] == all(verdict[part]["pass"] for part in ("rss", "series", "errors"))
    for field in ("slope_kib_per_min", "fitted_growth_kib", "max_minus_min_kib"):
        assert _number(verdict["rss"][field])
    assert _number(verdict["series"]["max_minus_min"])
    assert verdict["series"]["from_input"] == []  # hostile paths, methods and ids never label

    markdown = (tmp_path / "soak.md").read_text()
    assert "**Verdict: " in markdown
    assert "## Samples" in markdown
    if results["chart"]:
        assert (tmp_path / results["chart"]).stat().st_size > 1000
    assert not (tmp_path / "results.json").exists()  # the soak keeps to its own files
