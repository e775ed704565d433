"""The soak: ten minutes of mixed and hostile traffic; RSS and series must stay flat.

``python -m benchmarks --only soak [--soak-seconds N]`` (``make soak``). Not part of the
default run. The example app runs as shipped under a real uvicorn (one worker, its default
loop and HTTP parser), on a real PostgreSQL (``PERFMON_TEST_DSN``, else a throwaway cluster
as in the tests), with its loopback upstream, its caches and the loop monitor;
``benchmarks.soak_traffic`` drives it and samples the server every 10 s. After the warm-up
(the first fifth of the run) the verdict needs:

* **RSS**: growth of at most 1 MiB over the rest of the run, read off a least-squares line
  through the samples (one sample's allocator noise does not decide it). Over the ~8 minutes
  after a 10-minute run's warm-up that is a few bytes per request, less than the smallest
  object a per-request leak could keep (a dict entry or an int), so one leaked object per
  request fails it.
* **Series**: the same count at every sample, and no label value anywhere that came from the
  request (a path, method, query or request id the traffic invented). The traffic repeats
  every label combination it produces many times within a ten-minute run's warm-up (each
  random method on each matched route about 15 times), so a series born later is growth.
* **Errors**: none (no answer or a 5xx).

Writes ``soak.json``, ``soak.md`` and ``soak.png`` (RSS and series over time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import machine, soak_traffic
from tests._postgres import dsn_of_any_server
from tests._uvicorn import RunningServer, start_uvicorn

DEFAULT_SECONDS = 600.0
SMOKE_SECONDS = 8.0
WARMUP_SHARE = 0.2
MAX_INTERVAL_S = 10.0
RSS_LIMIT_BYTES = 1 << 20
KiB = 1024
MiB = 1024 * 1024
APP = "example_app.main:app"
UPSTREAM = "example_app.upstream:app"
APP_ENV = {
    "EXAMPLE_ENABLE_BLOCKING": "1",  # the loop watchdog gets something to catch every 20 s
    # Entries expire during the warm-up (their eviction series appear then, not later).
    "EXAMPLE_USER_CACHE_TTL": "30",
    # Account creation stays well under the 1 s slow threshold on a busy 2-core machine, so
    # the first slow POST /users (a new, bounded series) does not arrive after the warm-up.
    "EXAMPLE_PASSWORD_ITERATIONS": "10000",
}


def settings(seconds: float) -> dict[str, float]:
    """Warm-up and sampling interval for a run of ``seconds``: 120 s and 10 s for ten minutes."""
    return {
        "seconds": seconds,
        "warmup_s": round(seconds * WARMUP_SHARE, 2),
        "interval_s": round(min(MAX_INTERVAL_S, max(0.5, seconds / 30)), 2),
    }


@contextlib.contextmanager
def servers(
    log_file: Path, *, app: str = APP, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """The upstream stand-in and the example app (``app``), stopped gracefully on exit."""
    with (
        dsn_of_any_server() as dsn,
        start_uvicorn(UPSTREAM, args=["--no-access-log"], ready_path="/health") as upstream,
    ):
        app_env = {
            **APP_ENV,
            **(env or {}),
            "DATABASE_URL": dsn,
            "EXAMPLE_UPSTREAM_URL": upstream.url,
            "EXAMPLE_LOG_FILE": str(log_file),
        }
        with start_uvicorn(
            app, args=["--no-access-log"], env=app_env, ready_path="/health", timeout=60
        ) as server:
            yield server


def _slope_per_minute(samples: list[dict[str, Any]], field: str) -> float:
    minutes = [sample["t_s"] / 60 for sample in samples]
    values = [float(sample[field]) for sample in samples]
    return statistics.linear_regression(minutes, values).slope


def _spread(samples: list[dict[str, Any]], field: str) -> int:
    values = [sample[field] for sample in samples]
    return int(max(values) - min(values))


def verdict(soak: soak_traffic.Soak, warmup_s: float) -> dict[str, Any]:
    """The pass/fail criteria of the module docstring, applied to the post-warm-up samples."""
    after = [sample for sample in soak.samples if sample["t_s"] >= warmup_s]
    if len(after) < 2:
        return {"pass": False, "note": "fewer than two samples after the warm-up"}
    window_min = (after[-1]["t_s"] - after[0]["t_s"]) / 60
    rss_slope = _slope_per_minute(after, "rss_bytes")
    rss = {
        "slope_kib_per_min": round(rss_slope / KiB, 1),
        "slope_kib_per_min_second_half": round(
            _slope_per_minute(after[len(after) // 2 - 1 :], "rss_bytes") / KiB, 1
        ),
        "fitted_growth_kib": round(rss_slope * window_min / KiB, 1),
        "max_minus_min_kib": round(_spread(after, "rss_bytes") / KiB, 1),
        "first_mib": round(after[0]["rss_bytes"] / MiB, 2),
        "last_mib": round(after[-1]["rss_bytes"] / MiB, 2),
        "limit_kib": RSS_LIMIT_BYTES // KiB,
        "pass": rss_slope * window_min < RSS_LIMIT_BYTES,
    }
    requests = after[-1]["requests"] - after[0]["requests"]
    rss["limit_bytes_per_request"] = round(RSS_LIMIT_BYTES / requests, 1) if requests else None
    late = soak.series_at["last"] - soak.series_at["after_warmup"]
    series = {
        "after_warmup": after[0]["series"],
        "max_minus_min": _spread(after, "series"),
        "slope_per_min": round(_slope_per_minute(after, "series"), 2),
        "new_after_warmup_count": len(late),
        "new_after_warmup": [_series_name(key) for key in sorted(late)][:20],
        "from_input": sorted(soak.from_input)[:20],
        "from_input_count": len(soak.from_input),
    }
    series["pass"] = series["max_minus_min"] == 0 and not soak.from_input
    errors = {"count": after[-1]["errors"], "pass": after[-1]["errors"] == 0}
    others = {field: _spread(after, field) for field in ("threads", "open_files")}
    return {
        "window_s": round(after[-1]["t_s"] - after[0]["t_s"], 1),
        "requests_after_warmup": requests,
        "rss": rss,
        "series": series,
        "errors": errors,
        "max_minus_min_after_warmup": others,
        "pass": rss["pass"] and series["pass"] and errors["pass"],
    }


def _series_name(key: soak_traffic.SeriesKey) -> str:
    name, labels = key
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def _run_traffic(server: RunningServer, setting: dict[str, float]) -> soak_traffic.Soak:
    return asyncio.run(
        soak_traffic.run(
            server.url,
            server.process.pid,
            seconds=setting["seconds"],
            warmup_s=setting["warmup_s"],
            interval_s=setting["interval_s"],
        )
    )


def run(output: Path, *, seconds: float | None = None, smoke: bool = False) -> dict[str, Any]:
    """Run the soak, write ``soak[-smoke].json/.md/.png`` into ``output``; the results."""
    setting = settings(seconds or (SMOKE_SECONDS if smoke else DEFAULT_SECONDS))
    stem = "soak-smoke" if smoke else "soak"
    host = machine.describe()  # before the servers import the code it names
    with tempfile.TemporaryDirectory(prefix="perfmon-soak-") as work:
        log_file = Path(work) / "app.log"
        with servers(log_file) as server:
            print(f"[soak] {setting['seconds']:g} s against {server.url} ...", file=sys.stderr)
            soak = _run_traffic(server, setting)
        log_lines = _count_events(log_file)
    tally = soak.tally
    results = {
        "machine": {**host, "revision_at_end": machine.revision()},
        "settings": {
            **setting,
            "concurrency": soak_traffic.CONCURRENCY,
            "hostile_share": soak_traffic.HOSTILE_SHARE,
            "app_env": APP_ENV,
        },
        "totals": {
            "requests": tally.requests,
            "hostile_requests": tally.hostile,
            "scrapes": tally.scrapes,
            "statuses": {str(code): n for code, n in sorted(tally.stats.statuses.items())},
            "no_answer": tally.stats.failures,
            "log_events": log_lines,
        },
        "verdict": verdict(soak, setting["warmup_s"]),
        "samples": soak.samples,
    }
    results["chart"] = chart(results, output / f"{stem}.png")
    _write(results, output, stem)
    return results


def _count_events(log_file: Path) -> dict[str, int]:
    """How many of each log event the app wrote (slow requests, loop blocked, ...)."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError), log_file.open(errors="replace") as lines:
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError):
                event = str(json.loads(line).get("event"))
                counts[event] = counts.get(event, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _write(results: dict[str, Any], output: Path, stem: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / f"{stem}.md").write_text(markdown(results))


def chart(results: dict[str, Any], path: Path) -> str | None:
    """RSS and series over time, the warm-up shaded; the file name, or None (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = results["samples"]
    minutes = [sample["t_s"] / 60 for sample in samples]
    warmup_min = results["settings"]["warmup_s"] / 60
    figure, (memory, series) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    memory.plot(minutes, [sample["rss_bytes"] / MiB for sample in samples], marker=".")
    after = [sample for sample in samples if sample["t_s"] / 60 >= warmup_min]
    if len(after) >= 2:
        fit = statistics.linear_regression(
            [sample["t_s"] / 60 for sample in after],
            [sample["rss_bytes"] / MiB for sample in after],
        )
        ends = [after[0]["t_s"] / 60, after[-1]["t_s"] / 60]
        line = [fit.intercept + fit.slope * end for end in ends]
        memory.plot(ends, line, linestyle="--", color="tab:red", label="least-squares fit")
    memory.set_ylabel("server RSS, MiB")
    series.plot(minutes, [sample["series"] for sample in samples], marker=".", color="tab:green")
    series.set_ylabel("series in /metrics")
    series.set_xlabel("minutes")
    for axes in (memory, series):
        axes.axvspan(0, warmup_min, color="grey", alpha=0.15, label="warm-up")
        axes.grid(alpha=0.3)
    memory.legend(fontsize=8)
    memory.set_title("Soak: the example app under mixed and hostile traffic")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path.name


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return [*lines, *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def _verdict_lines(verdict: dict[str, Any]) -> list[str]:
    if "rss" not in verdict:
        return [f"**Verdict: fail** ({verdict.get('note')})", ""]
    rss, series, errors = verdict["rss"], verdict["series"], verdict["errors"]
    mark = {True: "pass", False: "**FAIL**"}
    per_request = rss["limit_bytes_per_request"]
    rows: list[list[object]] = [
        [
            "RSS",
            f"fitted growth < {rss['limit_kib']} KiB over the window"
            + (f" ({per_request} bytes per request)" if per_request else ""),
            f"{rss['fitted_growth_kib']:+.0f} KiB ({rss['slope_kib_per_min']:+.1f} KiB/min); "
            f"{rss['first_mib']} → {rss['last_mib']} MiB, "
            f"max-min {rss['max_minus_min_kib']:.0f} KiB; second half of the window "
            f"{rss['slope_kib_per_min_second_half']:+.1f} KiB/min",
            mark[rss["pass"]],
        ],
        [
            "series",
            "constant; no label value from request input",
            f"{series['after_warmup']} (max-min {series['max_minus_min']}); "
            f"from input: {series['from_input_count']}",
            mark[series["pass"]],
        ],
        ["errors", "none (no answer or 5xx)", errors["count"], mark[errors["pass"]]],
    ]
    lines = [
        f"**Verdict: {'pass' if verdict['pass'] else 'FAIL'}** over the "
        f"{verdict['window_s']:.0f} s after the warm-up "
        f"({verdict['requests_after_warmup']:,} requests).",
        "",
    ]
    lines += _table(["", "criterion", "measured", ""], rows)
    if series["new_after_warmup"]:
        lines += [
            "Series new after the warm-up:",
            "",
            *(f"- `{s}`" for s in series["new_after_warmup"]),
            "",
        ]
    if series["from_input"]:
        lines += [
            "Label values from request input:",
            "",
            *(f"- `{s}`" for s in series["from_input"]),
            "",
        ]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The report: setup, verdict, the samples."""
    host, setting, totals = results["machine"], results["settings"], results["totals"]
    statuses = ", ".join(f"{code}: {n:,}" for code, n in totals["statuses"].items())
    events = ", ".join(f"{name} {n:,}" for name, n in totals["log_events"].items())
    revision = host.get("revision") or "unknown"
    if host.get("revision_at_end", revision) != revision:
        revision += f" (at the end: {host['revision_at_end']}; the code changed during the run)"
    lines = [
        "# Soak: the example app under mixed and hostile traffic",
        "",
        f"- **Run**: {host['date']}, asgi-perfmon at {revision}; "
        f"{host['cpu']}, {host['cores']} cores (shared), {host['python']}; load average at "
        f"start {' / '.join(str(v) for v in host['load_average_at_start'])}",
        f"- **Setup**: `example_app` under uvicorn (one worker, no access log) on PostgreSQL, "
        f"with its upstream, the `users` and `settings` caches and the loop monitor; "
        f"{setting['seconds']:g} s, {setting['concurrency']} concurrent clients, warm-up "
        f"{setting['warmup_s']:g} s, a sample every {setting['interval_s']:g} s; "
        f"app environment {setting['app_env']}.",
        f"- **Traffic**: {totals['requests']:,} requests, {totals['hostile_requests']:,} of them "
        f"hostile ({setting['hostile_share']:.0%}: distinct random unmatched paths, long ones "
        "and `%00`/invalid UTF-8 escapes; random methods, WebDAV-style and made-up ones; "
        "random query strings); a random `X-Request-ID` on every request (safe, too long or "
        "unsafe); creates and deletes balanced; a `/metrics` scrape (OpenMetrics, gzip) every "
        f"2 s ({totals['scrapes']:,}); the blocking endpoint every 20 s.",
        f"- **Statuses**: {statuses}; no answer: {totals['no_answer']}",
        f"- **App log events**: {events or 'none'}",
        "",
        *_verdict_lines(results["verdict"]),
    ]
    if results.get("chart"):
        lines += [f"![RSS and series over time]({results['chart']})", ""]
    rows = [
        [
            f"{s['t_s']:.0f}",
            f"{s['rss_bytes'] / MiB:.2f}",
            s["series"],
            f"{s['requests']:,}",
            f"{s['hostile_requests']:,}",
            f"{s['server_requests']:,}",
            s["errors"],
            s["threads"],
            s["open_files"],
        ]
        for s in results["samples"]
    ]
    header = [
        "t (s)",
        "RSS MiB",
        "series",
        "requests",
        "hostile",
        "counted by the app",
        "errors",
        "threads",
        "open files",
    ]
    lines += ["## Samples", "", *_table(header, rows)]
    return "\n".join(lines).rstrip() + "\n"
