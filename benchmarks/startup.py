"""Start-up: wall time from launching `eqz generate` to its first token on stdout, on the default model.

The baseline is the shortest llama-cpp-python script that does the same (load the model with Llama(), stream a
completion), so the ratio is what eqz's own start-up (CLI, model checks, chat template, bank lookup) costs.
Both are fresh processes, run alternately; medians reported.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from report import EQZ, print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.models import resolve_model_path

ROUNDS = 5
PROMPT = "Say hello."
BASELINE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=4096, verbose=False)
for chunk in llm.create_completion(sys.argv[2], max_tokens=8, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"]); sys.stdout.flush()
"""


def first_output_seconds(command: list[str]) -> float:
    """Seconds from spawning ``command`` to the first byte it writes to stdout (then it is left to finish)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = process.stdout.read(1)
    seconds = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise RuntimeError(f"{command[0]} failed (exit {process.returncode}); run it by hand to see why")
    return seconds


def measure(rounds: int = ROUNDS) -> dict:
    model = str(resolve_model_path(None))
    eqz = [EQZ, "generate", PROMPT, "--model", model, "--max-tokens", "8", "--seed", "1"]  # the baseline's model
    baseline = [sys.executable, "-c", BASELINE, model, PROMPT]
    first_output_seconds(eqz)  # warm the page cache
    times: dict[str, list[float]] = {"eqz": [], "baseline": []}
    for _ in range(rounds):
        times["eqz"].append(first_output_seconds(eqz))
        times["baseline"].append(first_output_seconds(baseline))
    eqz_s, base_s = statistics.median(times["eqz"]), statistics.median(times["baseline"])
    return {"eqz_first_token_s": round(eqz_s, 3), "llama_cpp_python_first_token_s": round(base_s, 3),
            "startup_ratio": round(eqz_s / base_s, 2)}


def rows(figures: dict) -> list[tuple[str, str, str]]:
    return [
        ("start-up, llama-cpp-python script", f"{figures['llama_cpp_python_first_token_s']:.3f} s", "baseline, to first token"),
        ("start-up, eqz generate", f"{figures['eqz_first_token_s']:.3f} s", f"x{figures['startup_ratio']:.2f} of the script"),
    ]


def main() -> dict:
    figures = measure()
    print_figures(f"start-up to the first token (median of {ROUNDS} fresh processes)", rows(figures))
    return figures


if __name__ == "__main__":
    main()
