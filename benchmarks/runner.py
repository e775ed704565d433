"""The command line: run the chosen sections, then write JSON, Markdown and the chart."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import (
    cardinality,
    inprocess,
    machine,
    overhttp,
    pool_cache,
    report,
    scrape,
    soak,
    targets,
    variants,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
SECTIONS = ("inprocess", "http", "scrape", "cardinality", "pool_cache")
ON_REQUEST = ("soak",)  # run only when named with --only; results of their own


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="asgi-perfmon against a bare FastAPI app and its peers, in one run.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny iteration counts: proves it works, not speed"
    )
    parser.add_argument(
        "--only", choices=(*SECTIONS, *ON_REQUEST), action="append",
        help="run only this section (repeatable); soak runs only when named here",
    )  # fmt: skip
    parser.add_argument(
        "--soak-seconds", type=float, default=None,
        help=f"length of the soak (default {soak.DEFAULT_SECONDS:g} s, {soak.SMOKE_SECONDS:g} s "
        "with --smoke); results in soak.json/.md/.png",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results directory")
    parser.add_argument(
        "--variants", help="comma-separated variant names (default: every installed one)"
    )
    return parser


def _stem(smoke: bool) -> str:
    """File names: a smoke run never overwrites the full run's results."""
    return "smoke" if smoke else "results"


def _load_previous(path: Path, smoke: bool) -> dict[str, Any]:
    """An earlier run's results to merge a ``--only`` run into, if compatible."""
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return previous if previous.get("machine", {}).get("mode") == _mode(smoke) else {}


def _mode(smoke: bool) -> str:
    return "smoke" if smoke else "full"


def _section_runner(name: str, output: Path, smoke: bool) -> Callable[[list[str]], Any]:
    runners: dict[str, Callable[[list[str]], Any]] = {
        "inprocess": lambda names: inprocess.run(names, smoke=smoke),
        "http": lambda names: overhttp.run(names, smoke=smoke),
        "scrape": lambda names: scrape.run(names, smoke=smoke),
        "cardinality": lambda names: cardinality.run(names, smoke=smoke),
        "pool_cache": lambda names: pool_cache.run(output, smoke=smoke),
    }
    return runners[name]


def _write(results: dict[str, Any], output: Path, stem: str) -> None:
    json_path = output / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (output / f"{stem}.md").write_text(report.markdown(results))


def _choose(requested: str | None) -> tuple[list[str], list[str]]:
    wanted = None
    if requested:
        wanted = tuple(name.strip() for name in requested.split(","))
        unknown = [name for name in wanted if name not in variants.BY_NAME]
        if unknown:
            msg = f"unknown variants {unknown}; known: {list(variants.BY_NAME)}"
            raise SystemExit(msg)
        if variants.BARE not in wanted:
            wanted = (variants.BARE, *wanted)
    return variants.available_variants(wanted)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every section ran (targets are reported, not enforced)."""
    args = _parser().parse_args(argv)
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    chosen = tuple(args.only) if args.only else SECTIONS
    if "soak" in chosen:
        verdict = soak.run(output, seconds=args.soak_seconds, smoke=args.smoke)["verdict"]
        print(f"[bench] soak: {'pass' if verdict['pass'] else 'FAIL'}", file=sys.stderr)
        chosen = tuple(section for section in chosen if section != "soak")
        if not chosen:
            return 0
    names, missing = _choose(args.variants)
    stem = _stem(args.smoke)
    results = _load_previous(output / f"{stem}.json", args.smoke) if args.only else {}
    results["machine"] = {**machine.describe(), "mode": _mode(args.smoke)}
    results["variants"] = {
        name: variants.BY_NAME[name].description for name in names
    }  # fmt: skip
    results["missing"] = missing
    sections: dict[str, Any] = results.setdefault("sections", {})
    for section in chosen:
        print(f"[bench] {section} ({', '.join(names)}) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        sections[section] = _section_runner(section, output, args.smoke)(names)
        sections[section]["elapsed_s"] = round(time.perf_counter() - started, 1)
        print(f"[bench] {section} done in {sections[section]['elapsed_s']} s", file=sys.stderr)
        _write({**results, "targets": targets.evaluate(sections)}, output, stem)
    results["targets"] = targets.evaluate(sections)
    results["chart"] = None
    results["chart_note"] = None
    if "inprocess" in sections:
        chart_name = f"{stem}-overhead.png"
        note = report.chart(sections["inprocess"], output / chart_name)
        results["chart"], results["chart_note"] = (None, note) if note else (chart_name, None)
    _write(results, output, stem)
    print(report.markdown(results))
    print(f"[bench] wrote {output / stem}.json, .md", file=sys.stderr)
    return 0
