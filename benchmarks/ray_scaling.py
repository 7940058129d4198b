"""Rows per second of `eqz batch --ray` with 1 and 2 workers on this machine, beside a local run, same rows.

24 neutral prompts x 48 tokens, `--parallel 4`, each worker one thread. The rate is the rows over the time eqz
reports (`... in S s`), which for a Ray run includes starting a local cluster (`--ray auto`) and loading the model
in every worker, so short runs understate Ray; the wall time with the CLI's own start-up is printed beside it. On 2
cores expect little from a second worker: the point is that the same command runs on a cluster.

    python benchmarks/ray_scaling.py
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

from report import EQZ, print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.stimuli import neutral_prompts

PROMPTS = 24
TOKENS = 48


def run(prompts: Path, out: Path, *extra: str) -> dict:
    started = time.perf_counter()
    result = subprocess.run([EQZ, "batch", str(prompts), "-o", str(out), "-n", str(TOKENS), "--parallel", "4",
                             "--seed", "1", *extra], capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    seconds = float(re.search(r"tokens in ([\d.]+) s", result.stderr).group(1))
    return {"rows_per_s": round(PROMPTS / seconds, 2), "seconds": seconds, "wall_s": round(wall, 1)}


def main() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        prompts = folder / "prompts.txt"
        prompts.write_text("\n".join(neutral_prompts()[:PROMPTS]) + "\n")
        figures = {"local": run(prompts, folder / "local.jsonl", "--threads", "1"),
                   "ray_1": run(prompts, folder / "ray1.jsonl", "--ray", "auto", "--workers", "1"),
                   "ray_2": run(prompts, folder / "ray2.jsonl", "--ray", "auto", "--workers", "2")}
        same = (folder / "ray2.jsonl").read_text() == (folder / "local.jsonl").read_text()
    local = figures["local"]["rows_per_s"]
    print_figures(f"eqz batch on Ray ({PROMPTS} prompts x {TOKENS} tokens, --parallel 4, one thread per worker)", [
        ("local, 1 thread", f"{local:.2f} rows/s", "baseline"),
        ("Ray, 1 worker", f"{figures['ray_1']['rows_per_s']:.2f} rows/s",
         f"x{figures['ray_1']['rows_per_s'] / local:.2f}; {figures['ray_1']['wall_s']:.0f} s with start-up"),
        ("Ray, 2 workers", f"{figures['ray_2']['rows_per_s']:.2f} rows/s",
         f"x{figures['ray_2']['rows_per_s'] / local:.2f}; {figures['ray_2']['wall_s']:.0f} s with start-up; "
         f"file {'the same' if same else 'DIFFERENT'}"),
    ])
    return figures


if __name__ == "__main__":
    main()
