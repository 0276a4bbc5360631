"""``python -m benchmarks [--quick] [--write | --no-write] [--only KEY] [--url URL] [--charts-only]``.

The full run takes several minutes and writes ``docs/benchmarks.rst``; it
also starts a private RabbitMQ node (broker restarts) and a private 3-node
cluster (failover), always stopped again.  ``--quick`` (the CI smoke run)
takes well under a minute, starts no private node (those rows say
"skipped") and writes nothing unless ``--write`` is given.  Every row prints one ``[key] ...`` line per
result on stdout; progress goes to stderr.  The raw figures of every run go
to ``build/benchmarks/<mode>[-<keys>].json``.  Exit status 1 if a row failed to run (a
missed goal is a result, not a failure).  Writing the page also redraws its
charts (``docs/charts/bench-*.svg``) from the new table; ``--charts-only``
redraws them from the committed page without measuring anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from . import ROW_KEYS
from .machine import environment
from .model import Context, Row
from .charts import draw_benchmark_charts
from .render import console, page, plain
from .rows import ROWS
from .settings import Sizes

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.rst"
FIGURES = ROOT / "build" / "benchmarks"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke run; writes nothing by default")
    writing = parser.add_mutually_exclusive_group()
    writing.add_argument("--write", action="store_true", help="write the page even after --quick, --only or a failed row")
    writing.add_argument("--no-write", action="store_true", help="never write the page")
    parser.add_argument("--output", type=Path, default=PAGE, help=f"the page to write (default {PAGE.relative_to(ROOT)})")
    parser.add_argument("--only", action="append", choices=ROW_KEYS, metavar="KEY",
                        help=f"run only this row (repeatable): {', '.join(ROW_KEYS)}")
    parser.add_argument("--url", default=os.environ.get("CARROT_KOMBU_TEST_URL", DEFAULT_URL),
                        help="broker URL (default: $CARROT_KOMBU_TEST_URL or the local RabbitMQ)")
    parser.add_argument("--charts-only", action="store_true",
                        help="only redraw the page's charts from its table (measures nothing, needs no broker)")
    return parser.parse_args(argv)


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"  .. {plain(message)}", file=sys.stderr, flush=True)


def run_rows(ctx: Context, keys: list[str]) -> tuple[list[Row], list[str]]:
    """Run the rows; a row that raises becomes a ``failed`` row.

    Returns:
        The rows and the keys that failed.
    """
    rows: list[Row] = []
    failed: list[str] = []
    for key in keys:
        title, function = ROWS[key]
        log(f"{title} ...")
        started = time.monotonic()
        try:
            produced = function(ctx)
        except Exception as exc:
            traceback.print_exc()
            failed.append(key)
            produced = [Row(key=key, label=title, measured=f"failed: {type(exc).__name__}: {exc}")]
        log(f"{title}: {time.monotonic() - started:.1f} s")
        for row in produced:
            print(console(row), flush=True)
        rows.extend(produced)
    return rows, failed


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmarks, print them, write the page when asked to."""
    args = parse(argv)
    if args.charts_only:
        if not args.output.exists():
            print(f"--charts-only draws from {args.output}, which does not exist: run the benchmarks first",
                  file=sys.stderr)
            return 2
        for path in draw_benchmark_charts(args.output.read_text(), into=args.output.parent / "charts"):
            print(f"drew {path}", flush=True)
        return 0
    sizes = Sizes.quick() if args.quick else Sizes.full()
    keys = [key for key in ROW_KEYS if not args.only or key in args.only]
    started = time.monotonic()
    try:
        env = environment(args.url)
    except Exception as exc:
        print(f"cannot reach the broker at {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    log(f"{sizes.mode} run on {env['broker']} at {env['broker_at']}: {', '.join(keys)}")
    rows, failed = run_rows(Context(url=args.url, sizes=sizes, log=log), keys)
    seconds = time.monotonic() - started

    FIGURES.mkdir(parents=True, exist_ok=True)
    suffix = "" if keys == list(ROW_KEYS) else "-" + "-".join(keys)
    figures = FIGURES / f"{sizes.mode}{suffix}.json"
    figures.write_text(json.dumps({
        "environment": env, "sizes": dataclasses.asdict(sizes), "seconds": seconds,
        "rows": [dataclasses.asdict(row) for row in rows],
    }, indent=2, default=str))

    write = args.write or not (args.no_write or args.quick or args.only or failed)
    if write:
        args.output.write_text(page(rows, env, sizes, seconds))
        charts = draw_benchmark_charts(args.output.read_text(), into=args.output.parent / "charts")  # beside the page
        where = f"wrote {args.output} and {len(charts)} chart(s)"
    else:
        why = "a row failed" if failed and not (args.quick or args.only or args.no_write) else "not asked to"
        where = f"did not write {args.output} ({why}; --write forces it)"
    missed = sum(1 for row in rows if row.met is False)
    met = sum(1 for row in rows if row.met)
    print(f"done in {seconds:.1f} s: {met} goal(s) met, {missed} missed, {len(failed)} row(s) failed; "
          f"{where}; figures in {figures}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
