"""Decode beside busy jobs: `eqz generate -n 32` wall time with a busy process on every physical core (another
model run, a build), for eqz's default thread count against a thread per physical core (what eqz did before,
and llama.cpp's own default) and a single thread. Runs alternate; medians reported.

What it shows: llama.cpp's threads meet at a barrier many times per token, so a thread that shares a core with
another job stalls the others; the default leaves busy cores out.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from report import EQZ, print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.threads import physical_cores

ROUNDS = 3
COMMAND = [EQZ, "generate", "Describe your morning.", "-n", "32", "--seed", "1"]


def seconds(extra: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(COMMAND + extra, check=True, capture_output=True)
    return time.perf_counter() - started


def measure(rounds: int = ROUNDS) -> dict:
    cores = physical_cores()
    settings = {"default": [], "per_core": ["--threads", str(cores)], "one": ["--threads", "1"]}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        times: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(rounds):
            for name, extra in settings.items():
                times[name].append(seconds(extra))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return {"busy_processes": len(spinners), "physical_cores": cores,
            **{f"{name}_s": round(statistics.median(runs), 2) for name, runs in times.items()}}


def rows(figures: dict) -> list[tuple[str, str, str]]:
    busy = f"{figures['busy_processes']} busy processes, {figures['physical_cores']} cores"
    return [
        ("32 tokens beside busy jobs, a thread per core", f"{figures['per_core_s']:.2f} s", f"baseline ({busy})"),
        ("32 tokens beside busy jobs, eqz default", f"{figures['default_s']:.2f} s",
         f"x{figures['default_s'] / figures['per_core_s']:.2f} of the baseline; 1 thread: {figures['one_s']:.2f} s"),
    ]


def main() -> dict:
    figures = measure()
    print_figures(f"decode beside busy jobs (median of {ROUNDS} runs each)", rows(figures))
    return figures


if __name__ == "__main__":
    main()
