"""The GPU path, checked against the CPU path of the same build, side by side: run on a machine with a GPU after
`make setup GPU=cuda` (or metal, vulkan).

For --gpu-layers 0 and all, through the real CLI on the default model: a greedy reply with a slider (text, meter,
tok/s), the same with a filter (clamp joy=1), a short batch (rows, tok/s), and `eqz train --quick` on two bands
(seconds). Then: is the greedy text the same; if not, do the meters agree within TOLERANCE; the speed ratios.
Figures go to stdout and benchmarks/gpu_results.json.

    python benchmarks/gpu_check.py [--no-train] [--dry-run]
"""

from __future__ import annotations

import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from report import EQZ, print_figures, script_parser  # benchmarks/ is on sys.path: it holds the script being run

from eqz.api import llama_build

HERE = Path(__file__).resolve().parent
PROMPT = "Tell me about your morning."
PROMPTS = ["Describe a walk by the river.", "Explain how a kettle works.", "Write a note about the recycling bins.",
           "What do you think of rainy Mondays?"]
TOLERANCE = 0.05  # largest meter difference (band units) accepted where kernels change the text


def eqz(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([EQZ, *args], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"eqz {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result, time.perf_counter() - started


def side(layers: str, folder: Path, train: bool) -> dict:
    figures = {}
    for name, extra in (("slider", ["--set", "joy=1"]), ("filter", ["--clamp", "joy=1"])):
        result, _ = eqz("generate", PROMPT, *extra, "--temperature", "0", "-n", "64", "--json", "-ngl", layers)
        record = json.loads(result.stdout)
        figures[name] = {"text": record["output"], "meter": record.get("meter", {}),
                         "tok_s": record["tokens_per_second"]}
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = folder / f"batch-{layers}.jsonl"
    _, seconds = eqz("batch", str(prompts), "-o", str(out), "--set", "joy=0.5", "-n", "32", "--parallel", "4",
                     "--seed", "1", "--meter", "-ngl", layers)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    figures["batch"] = {"outputs": [row["output"] for row in rows], "seconds": round(seconds, 2),
                        "tokens": sum(row["n_tokens"] for row in rows)}
    if train:
        _, seconds = eqz("train", "--quick", "--bands", "joy,sadness", "-o", str(folder / f"bank-{layers}"),
                         "-ngl", layers)
        figures["train_quick_s"] = round(seconds, 1)
    return figures


def largest_meter_gap(a: dict, b: dict) -> float:
    return max((abs(a[band] - b[band]) for band in a if band in b), default=0.0)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--no-train", action="store_true", help="skip the two quick trainings")
    parser.add_argument("--dry-run", action="store_true", help="run on a CPU build too (checks this script)")
    args = parser.parse_args()
    build = llama_build()
    backends = build["backends"]
    if not build["gpu_offload"] and not args.dry_run:
        raise SystemExit("this llama.cpp has no GPU backend: run `make setup GPU=cuda` (or metal, vulkan) first")
    with tempfile.TemporaryDirectory() as folder:
        cpu = side("0", Path(folder), not args.no_train)
        gpu = side("all", Path(folder), not args.no_train)
    results = {"backends": backends, "machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
               "cpu": cpu, "gpu": gpu}
    rows = []
    for name in ("slider", "filter"):
        same = cpu[name]["text"] == gpu[name]["text"]
        gap = largest_meter_gap(cpu[name]["meter"], gpu[name]["meter"])
        results[f"{name}_same_text"], results[f"{name}_meter_gap"] = same, round(gap, 4)
        verdict = "same greedy text" if same else f"text differs; meters within {gap:.3f} (tolerance {TOLERANCE})"
        rows.append((f"generate, {name}", f"{gpu[name]['tok_s']:.0f} tok/s",
                     f"x{gpu[name]['tok_s'] / cpu[name]['tok_s']:.2f} of CPU; {verdict}"))
    same_rows = sum(a == b for a, b in zip(cpu["batch"]["outputs"], gpu["batch"]["outputs"]))
    rows.append(("batch, 4 rows", f"{gpu['batch']['seconds']:.1f} s",
                 f"CPU {cpu['batch']['seconds']:.1f} s; {same_rows}/4 rows the same text"))
    if "train_quick_s" in gpu:
        rows.append(("train --quick, 2 bands", f"{gpu['train_quick_s']:.0f} s", f"CPU {cpu['train_quick_s']:.0f} s"))
    if not args.dry_run:
        (HERE / "gpu_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_figures(f"GPU ({' + '.join(backends)}) against CPU, same build, default model", rows)
    failed = [name for name in ("slider", "filter")
              if not results[f"{name}_same_text"] and results[f"{name}_meter_gap"] > TOLERANCE]
    if failed:
        raise SystemExit(f"the GPU path disagrees with the CPU path beyond {TOLERANCE}: {', '.join(failed)}")


if __name__ == "__main__":
    main()
