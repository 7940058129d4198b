"""Outputs pinned across refactors: for the same seed and settings, `eqz generate` and `eqz batch` give the text
(and meter) recorded in tests/data/golden.json by an earlier commit. A change in what eqz writes is then a
decision made on purpose (re-record with EQZ_RECORD_GOLDEN=1 and say why in the commit), never a side effect.

Numbers are compared to 2 decimals and texts exactly: llama.cpp's CPU kernels are deterministic for a given build
and thread split of rows, and these prompts are short enough that no sampled token sits on a rounding edge. A build
for another CPU is not (-march=native: a Sapphire Rapids VM's build sampled "with the intention to take care" where
the recording said "with the sun, feeling refreshed"), so the file keeps one recording per kind of CPU the same
commit passed on, and the outputs must equal one of them. EQZ_RECORD_GOLDEN=1 replaces them all with this
machine's (outputs changed on purpose: the others are stale); EQZ_RECORD_GOLDEN=add adds this machine's beside
them, only where the same commit matches a recording on another machine (the numerics moved, not eqz)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import run_eqz

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "data" / "golden.json"
PROMPTS = ["Tell me about rain.", "What is a good breakfast?"]
GENERATE_CASES = {
    "plain": ["Describe your morning.", "-n", "20", "--seed", "3"],
    "joy": ["Describe your morning.", "-n", "20", "--seed", "3", "--set", "joy=1"],
    "preset, greedy": ["Hi", "-n", "20", "--preset", "melancholy", "--temperature", "0"],
    "filters": ["Hi there", "-n", "20", "--seed", "7", "--set", "fear=1", "--clamp", "fear=0.5", "--ablate", "anger"],
}


def _generated(args: list[str]) -> dict:
    ran = run_eqz("generate", *args, "--json")
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    return {"output": record["output"], "meter": record.get("meter")}


def _batch_rows(tmp_path: Path) -> list[dict]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "rows.jsonl"
    ran = run_eqz("batch", str(prompts), "-o", str(out), "--sweep", "joy=-1:1:3", "--presets", "serene,curious",
                  "-n", "12", "--seed", "5", "--parallel", "3", "--meter")
    assert ran.returncode == 0, ran.stderr
    return [{"id": row["id"], "output": row["output"], "meter": row["meter"]}
            for row in map(json.loads, out.read_text().splitlines())]


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _this_cpu() -> str:
    """The CPU model and the vector extensions -march=native picks from, to say where a recording was made."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{model}; " + " ".join(sorted(flag for flag in flags if flag.startswith(("avx", "amx", "f16c", "fma"))))


def test_generate_and_batch_give_the_recorded_outputs(tmp_path):
    now = {"generate": {name: _generated(args) for name, args in GENERATE_CASES.items()},
           "batch": _batch_rows(tmp_path)}
    assert len(now["batch"]) == len(PROMPTS) * 3 * 2
    recordings = json.loads(GOLDEN.read_text())["recordings"]
    record = os.environ.get("EQZ_RECORD_GOLDEN")
    if record:
        # EQZ_GOLDEN_CPU: the kind a recording stands for, where this machine emulates it (DEVELOPERS.md)
        recordings = (recordings if record == "add" else []) + [{"cpu": os.environ.get("EQZ_GOLDEN_CPU")
                                                                 or _this_cpu(), **now}]
        GOLDEN.write_text(json.dumps({"recordings": recordings}, indent=1, ensure_ascii=False) + "\n")
    matching = [recording["cpu"] for recording in recordings
                if _rounded(now["generate"]) == _rounded(recording["generate"])
                and _rounded(now["batch"]) == _rounded(recording["batch"])]
    assert matching, (f"outputs differ from all {len(recordings)} recordings (made on: "
                      f"{' / '.join(r['cpu'] for r in recordings)}; this CPU: {_this_cpu()}); see this file's docstring")
