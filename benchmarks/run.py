"""`make bench`: the speed benchmarks in one run (~25 min on 2 cores); figures to benchmarks/results.json and the
README's performance table.

Each benchmark measures its own baseline side by side (see its docstring); this only collects and renders. The
figures measured so far are kept in results.partial.json while it runs, so a failure late in the run loses only
the benchmark that failed. ``--only decode,startup`` runs some and prints them, writing neither file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import batch  # noqa: E402
import decode  # noqa: E402
import serve  # noqa: E402
import startup  # noqa: E402
import training  # noqa: E402
import under_load  # noqa: E402

import eqz  # noqa: E402

BENCHMARKS = (("decode", decode), ("batch", batch), ("startup", startup), ("training", training), ("under_load", under_load),
              ("serve", serve))
RESULTS = HERE / "results.json"
PARTIAL = HERE / "results.partial.json"
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(results: dict) -> str:
    """The README's performance table, from results.json: the rows each benchmark prints."""
    machine = results["machine"]
    lines = [
        f"Measured by `make bench` on {results['date']} ({machine['cpus']} CPUs, {machine['processor']}, "
        f"eqz {results['eqz_version']}{' at ' + results['commit'] if results.get('commit') else ''}, "
        f"{results['decode']['threads']} threads, default model).",
        "",
        "| what | figure | against its baseline, same run |",
        "|---|---|---|",
    ]
    for name, module in BENCHMARKS:
        lines += [f"| {what} | {figure} | {note} |" for what, figure, note in module.rows(results[name])]
    return "\n".join(lines)


def update_readme(results: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table(results)}\n{END}{tail}")


def commit() -> str | None:
    """The checkout measured (``-dirty`` with uncommitted changes), so a table can be traced to its code."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True)
    except OSError:  # no git here
        return None
    return described.stdout.strip() or None


def main() -> None:
    names = [name for name, _ in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated, of: {', '.join(names)}")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else names
    unknown = [name for name in chosen if name not in names]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(names)}")
    started = time.perf_counter()
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "eqz_version": eqz.__version__,
        "commit": commit(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version()},
    }
    for name, module in BENCHMARKS:
        if name in chosen:
            results[name] = module.main()
            print()
            if not args.only:
                PARTIAL.write_text(json.dumps(results, indent=2) + "\n")
    if args.only:
        return
    results["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    PARTIAL.unlink(missing_ok=True)
    update_readme(results)
    print(f"all benchmarks in {results['seconds']:.0f} s; figures in benchmarks/results.json")


if __name__ == "__main__":
    main()
