"""`make bench`: every benchmark in one run; figures to benchmarks/results.json and the README's performance table.

Each benchmark measures its own baseline side by side (see its docstring); this only collects and renders.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import batch  # noqa: E402
import decode  # noqa: E402
import startup  # noqa: E402
import training  # noqa: E402

import eqz  # noqa: E402

RESULTS = HERE / "results.json"
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(results: dict) -> str:
    """The README's performance table, from results.json."""
    d, b, t, s = (results[k] for k in ("decode", "batch", "training", "startup"))
    rows = [
        ("decode, unsteered", f"{d['unsteered_tok_s']} tok/s", "baseline"),
        ("decode, all 10 bands steered", f"{d['steered_tok_s']} tok/s", f"x{d['steered_ratio']} of unsteered (target >= 0.98)"),
        ("decode, steered + meter", f"{d['meter_tok_s']} tok/s", f"x{d['meter_ratio']} of steered (target >= 0.95)"),
        ("decode, steered + meter + 2 filters", f"{d['filters_tok_s']} tok/s", f"x{d['filters_ratio']} of steered"),
        ("one slider change mid-reply", f"{d['vector_change_ms']} ms", "set + re-reserve of the next decode"),
        ("batch `--parallel 1`", f"{b['parallel_1_tok_s']} tok/s", "baseline"),
        ("batch `--parallel 8`", f"{b['parallel_8_tok_s']} tok/s", f"x{b['ratio']} (target >= 2.5)"),
        ("training capture (hidden states)", f"{t['capture_tok_s']} tok/s", f"x{t['capture_ratio']} of plain prompt processing ({t['plain_prompt_tok_s']} tok/s)"),
        ("full bank, `eqz train`", f"{t['train_wall_s']} s", f"target <= {t['train_target_s']} s"),
        ("start-up to first token, `eqz generate`", f"{s['eqz_first_token_s']} s", f"x{s['startup_ratio']} of a bare llama-cpp-python script ({s['llama_cpp_python_first_token_s']} s)"),
    ]
    machine = results["machine"]
    lines = [
        f"Measured by `make bench` on {results['date']} ({machine['cpus']} CPUs, {machine['processor']}, "
        f"eqz {results['eqz_version']}, {d['threads']} threads, default model).",
        "",
        "| what | figure | against its baseline, same run |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {figure} | {ratio} |" for what, figure, ratio in rows]
    return "\n".join(lines)


def update_readme(results: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table(results)}\n{END}{tail}")


def main() -> None:
    started = time.perf_counter()
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "eqz_version": eqz.__version__,
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version()},
    }
    for name, module in (("decode", decode), ("batch", batch), ("startup", startup), ("training", training)):
        results[name] = module.main()
        print()
    results["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    update_readme(results)
    print(f"all benchmarks in {results['seconds']:.0f} s; figures in benchmarks/results.json")


if __name__ == "__main__":
    main()
