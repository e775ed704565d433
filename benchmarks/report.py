"""The Markdown report and the overhead chart, both made from the results JSON."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import variants

MiB = 1024 * 1024


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _machine(machine: dict[str, Any]) -> list[str]:
    packages = ", ".join(
        f"{name} {version}" for name, version in machine["packages"].items() if version
    )
    load = machine.get("load_average_at_start") or []
    return [
        f"- **Machine**: {machine['cpu']}, {machine['cores']} cores (`nproc`), {machine['os']}",
        f"- **Python**: {machine['python']}; wrk: {machine.get('wrk') or 'not installed'}",
        f"- **Packages**: {packages}",
        f"- **Run**: {machine['date']}, asgi-perfmon at {machine.get('revision') or 'unknown'}, "
        f"{machine['mode']} mode, load average at start "
        f"{' / '.join(str(v) for v in load) or 'unknown'}",
        "",
    ]


def _inprocess(section: dict[str, Any]) -> list[str]:
    scenarios = section["scenarios"]
    names = list(next(iter(scenarios.values())))
    header = ["variant", *(f"{name}" for name in scenarios)]
    rows = []
    for name in names:
        cells = [f"**{name}**" if name == variants.PERFMON else name]
        for summary in scenarios.values():
            row = summary[name]
            if name == variants.BARE:
                cells.append(f"{row['median']:.1f} µs")
            else:
                cells.append(f"{row['overhead']:+.1f} µs (x{row['ratio']:.2f})")
        rows.append(cells)
    settings = section["settings"]
    return [
        "## 1. In-process overhead per request",
        "",
        "The bare row is the median time per request; every other row is the overhead over the "
        "bare app (median of the paired per-round differences) and the ratio of medians. "
        f"{settings['rounds']} interleaved rounds; in each, every variant ran "
        f"{settings.get('repeats', 1)} interleaved batches of {settings['batch']} requests per "
        "scenario and the fastest batch counts for the round (other work on the machine only "
        f"ever slows a batch down); {settings['warmup']} warm-up requests; GC off inside timed "
        "batches; "
        "lifespan run first (asgi-perfmon's event-loop monitor is on); fresh ids per request.",
        "",
        *_table(header, rows),
        *_every_batch(section),
        *_checks(section["checks"]),
    ]


def _every_batch(section: dict[str, Any]) -> list[str]:
    """The same overheads with every batch counted, for comparison with the estimator above."""
    every = section.get("every_batch_overhead")
    if not every:
        return []
    parts = []
    for scenario, overheads in every.items():
        cells = ", ".join(
            f"{name} {value:+.1f}" for name, value in overheads.items() if name != variants.BARE
        )
        parts.append(f"- {scenario}: {cells} µs")
    return [
        "",
        "With every batch counted instead of the fastest per round (median of the paired "
        "differences over all batches):",
        "",
        *parts,
        "",
    ]


def _checks(checks: dict[str, Any]) -> list[str]:
    rows = [
        (name, check["series_after_warmup"], "yes" if check["labels_route_template"] else "no")
        for name, check in checks.items()
        if name not in variants.UNINSTRUMENTED
    ]
    return [
        "Each variant answered every scenario correctly and recorded it:",
        "",
        *_table(["variant", "series after warm-up", "labels `/items/{item_id}`"], rows),
    ]


def _http(section: dict[str, Any]) -> list[str]:
    if "variants" not in section:
        return ["## 2. Over HTTP", "", f"Skipped: {section.get('note', '')}", ""]
    rows = [
        (
            f"**{name}**" if name == variants.PERFMON else name,
            f"{row['requests_per_s']:.0f}",
            f"{row['rps_ratio']:.1%}",
            f"{row['p50_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            f"x{row['p99_ratio']:.2f}",
            _cpu_cell(row),
        )
        for name, row in section["variants"].items()
    ]
    settings = section["settings"]
    stack = section["uvicorn"]
    return [
        "## 2. Over HTTP (uvicorn, one worker, loopback)",
        "",
        f"{section['load_generator']}, {settings['connections']} connections, "
        f"{settings['rounds']} rounds of {settings['seconds']:g} s per variant, each run right "
        "next to a run of the bare app (bare first in one round, second in the next), "
        f"{section['route']}; uvicorn with {stack['loop']} and {stack['http']}, "
        "access log off. Requests/s and latencies are medians over a variant's runs; ratios and "
        "overheads are medians over its adjacent pairs with the bare app. Server CPU: the "
        "uvicorn process's user + system "
        "time per request (in brackets: over the bare app), less disturbed by other load on "
        "the machine than requests/s.",
        "",
        *_table(
            [
                "variant",
                "req/s",
                "of bare",
                "p50 ms",
                "p99 ms",
                "p99 vs bare",
                "server CPU µs/request",
            ],
            rows,
        ),
    ]


def _cpu_cell(row: dict[str, Any]) -> str:
    cpu = row.get("server_cpu_us_per_request")
    if cpu is None:
        return "n/a"
    overhead = row.get("server_cpu_overhead_us") or 0.0
    return f"{cpu:.0f} ({overhead:+.0f})"


def _scrape(section: dict[str, Any]) -> list[str]:
    lines = [
        "## 3. `/metrics` after traffic over routes x 4 methods x 5 statuses",
        "",
        "Scraped in process the way Prometheus scrapes (OpenMetrics preferred, gzip accepted) "
        "through each library's documented endpoint. Stall: the longest time a 1 ms timer on "
        "the event loop ran late while the scrape was in flight (idle: the same probe with no "
        "scrape).",
        "",
    ]
    for size, results in section["sizes"].items():
        rows = [
            (
                f"**{name}**" if name == variants.PERFMON else name,
                f"{row['series']:,}",
                f"{row['render_ms_median']:.1f}",
                f"{row['bytes_uncompressed'] / 1024:,.0f} KiB",
                f"{row['bytes_sent'] / 1024:,.0f} KiB" + (" (gzip)" if row["gzip"] else ""),
                "OpenMetrics" if row["openmetrics"] else "text 0.0.4",
                f"{row['stall_ms_median']:.1f} / {row['stall_ms_max']:.1f}",
                f"{row['idle_stall_ms_max']:.1f}",
            )
            for name, row in results.items()
        ]
        routes = next(iter(results.values()))["routes"] if results else 0
        note = " (about 10,000 series for asgi-perfmon)" if size == "10k_series" else ""
        lines += [
            f"**{routes} routes**{note}:",
            "",
            *_table(
                ["variant", "series", "scrape ms", "size", "sent", "format",
                 "stall ms (median / max)", "idle max ms"],
                rows,
            ),
        ]  # fmt: skip
    return lines


def _cardinality(section: dict[str, Any]) -> list[str]:
    rows = []
    for name, result in section["variants"].items():
        first, last = result["checkpoints"][0], result["checkpoints"][-1]
        rows.append(
            (
                f"**{name}**" if name == variants.PERFMON else name,
                f"{first['series']:,} → {last['series']:,}",
                f"{first['rss_bytes'] / MiB:.1f} → {last['rss_bytes'] / MiB:.1f} MiB",
                f"{result['rss_growth_bytes'] / 1024:+,.0f} KiB",
            )
        )
    checkpoints = section["checkpoints"]
    return [
        "## 4. Cardinality and memory against distinct raw paths",
        "",
        f"{section['paths']}; from {checkpoints[0]:,} to {checkpoints[-1]:,} paths, one process "
        "per variant, RSS after a full collection.",
        "",
        *_table(["variant", "series", "RSS", "RSS growth"], rows),
    ]


def _scalar(value: object) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _nested_tables(title: str, data: dict[str, Any]) -> list[str]:
    """Dicts of flat dicts become tables; flat dicts become two-column tables."""
    lines: list[str] = []
    values = list(data.values())
    if values and all(isinstance(v, dict) and all(map(_scalar, v.values())) for v in values):
        columns = list(dict.fromkeys(key for v in values for key in v))
        rows = [(name, *(row.get(c, "") for c in columns)) for name, row in data.items()]
        return [f"*{title}*", "", *_table(["", *columns], rows)]
    flat = {k: v for k, v in data.items() if _scalar(v)}
    if flat:
        lines += [f"*{title}*", "", *_table(["", "value"], flat.items())]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += _nested_tables(f"{title} / {key}" if title else key, value)
    return lines


def _pool_cache(section: dict[str, Any]) -> list[str]:
    lines = ["## 5. Pool and cache instrumentation", ""]
    if section.get("status") != "ok":
        return [*lines, f"Not measured: {section.get('note', section.get('status'))}", ""]
    lines += [
        "From `benchmarks/bench_pool_cache.py` (a real PostgreSQL), written to "
        f"`{section['file']}`.",
        "",
    ]
    body = {k: v for k, v in section.items() if k not in ("status", "file", "environment")}
    for key, value in body.items():
        if isinstance(value, dict):
            lines += _nested_tables(key, value)
    return lines


def _targets(checks: list[dict[str, Any]]) -> list[str]:
    rows = [
        (c["target"], c["measured"], {True: "met", False: "**missed**", None: "n/a"}[c["met"]])
        for c in checks
    ]
    return ["## Targets", "", *_table(["target", "measured", ""], rows)]


def markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    sections = results["sections"]
    lines = ["# asgi-perfmon against its peers", "", *_machine(results["machine"])]
    lines += _targets(results["targets"])
    renderers = {
        "inprocess": _inprocess,
        "http": _http,
        "scrape": _scrape,
        "cardinality": _cardinality,
        "pool_cache": _pool_cache,
    }
    for name, render in renderers.items():
        if name in sections:
            lines += render(sections[name])
    if results.get("chart"):
        lines += [f"![overhead per variant]({results['chart']})", ""]
    elif results.get("chart_note"):
        lines += [f"No chart: {results['chart_note']}", ""]
    lines += (
        [f"Missing variants (not installed): {', '.join(results['missing'])}", ""]
        if results["missing"]
        else []
    )
    return "\n".join(lines).rstrip() + "\n"


def chart(section: dict[str, Any], path: Path) -> str | None:
    """A bar chart of the in-process overhead per variant and scenario; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    scenarios = section["scenarios"]
    names = [n for n in next(iter(scenarios.values())) if n != variants.BARE]
    width = 0.8 / len(scenarios)
    figure, axes = plt.subplots(figsize=(11, 5.5))
    for index, (scenario, summary) in enumerate(scenarios.items()):
        offsets = [i + (index - (len(scenarios) - 1) / 2) * width for i in range(len(names))]
        values = [summary[name]["overhead"] for name in names]
        bars = axes.bar(offsets, values, width, label=scenario)
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axes.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    axes.set_ylabel("overhead over the bare app, µs per request (median)")
    axes.set_title("In-process overhead per request (lower is better)")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
