"""`eqz serve` against `eqz batch`, and under load; both as users run them, processes on loopback.

1. Throughput: 24 prompts x 64 tokens. `eqz batch --parallel 8` (one mood for all rows: batch runs a setting at
   a time) against `eqz serve --parallel 8` answering the same prompts from 8 concurrent clients, each prompt with
   a different mood (every decode mixes eight moods), not streamed (batch does not stream either; the clients
   share the 2 cores with the server). tok/s = reply tokens / wall time after start-up. Three rounds, batch and
   serve taking turns, so a slow spell on this shared machine lands on both; the ratio is the median round's.
2. Load: 200 chat requests from 16 concurrent clients, mixed moods, streaming, every tenth client leaving after
   its third chunk. Counted: 5xx answers, replies lost (no final chunk) or duplicated (an id twice), and the
   server's resident memory after each quarter of the run.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from report import EQZ, print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.stimuli import neutral_prompts

PROMPTS, TOKENS, PARALLEL, ROUNDS = 24, 64, 8, 3
MOODS = [{}, {"joy": 1}, {"sadness": 1}, {"fear": 0.8}, {"anger": 1}, {"trust": 1}, {"surprise": 1}, {"joy": -1}]
LOAD_REQUESTS, LOAD_CLIENTS, LOAD_TOKENS = 200, 16, 32


def batch_tok_s(prompts: list[str]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "prompts.txt"
        source.write_text("\n".join(prompts) + "\n")
        done = subprocess.run([EQZ, "batch", str(source), "-o", str(Path(folder) / "out.jsonl"), "--set", "joy=1",
                               "-n", str(TOKENS), "--parallel", str(PARALLEL), "--seed", "1"],
                              capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+) tok/s -> ", done.stderr).group(1))


class Server:
    def __init__(self, *args: str):
        self.process = subprocess.Popen([EQZ, "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True)
        self.url = "http://127.0.0.1:" + re.search(r":(\d+)/", self.process.stderr.readline()).group(1)
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def chat(self, prompt: str, mood: dict, seed: int, tokens: int, leave_after: int | None = None) -> dict:
        """One streamed chat request; returns its status, id, reply tokens and whether the final chunk came."""
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "seed": seed, "stream": True,
                "eqz": {"sliders": mood}}
        request = urllib.request.Request(self.url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                result = {"status": response.status, "id": response.headers["X-Eqz-Stream"], "final": False,
                          "tokens": 0}
                chunks = 0
                for line in response:
                    if not line.startswith(b"data: {"):
                        continue
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        return {**result, "left": True}
                    chunk = json.loads(line[6:])
                    if chunk["choices"][0]["finish_reason"]:
                        result.update(final=True, tokens=chunk["eqz"]["n_tokens"])
                return result
        except urllib.error.HTTPError as error:
            return {"status": error.code, "id": None, "final": False, "tokens": 0}

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def serve_tok_s(server: Server, prompts: list[str]) -> float:
    def ask(i: int) -> int:
        body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": TOKENS, "seed": i,
                "eqz": {"sliders": MOODS[i % len(MOODS)]}}
        request = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(PARALLEL) as pool:
        tokens = sum(pool.map(ask, range(len(prompts))))
    return tokens / (time.perf_counter() - started)


def load(server: Server, prompts: list[str]) -> dict:
    memory = [round(server.rss_mb())]
    results = []
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        for quarter in range(4):
            numbers = range(quarter * LOAD_REQUESTS // 4, (quarter + 1) * LOAD_REQUESTS // 4)
            results += pool.map(lambda i: server.chat(prompts[i % len(prompts)], MOODS[i % len(MOODS)], i, LOAD_TOKENS,
                                                      leave_after=3 if i % 10 == 9 else None), numbers)
            memory.append(round(server.rss_mb()))
    stayed = [r for r in results if not r.get("left")]
    ids = [r["id"] for r in results if r["id"]]
    return {"requests": len(results), "clients": LOAD_CLIENTS, "left_mid_stream": len(results) - len(stayed),
            "server_errors": sum(r["status"] >= 500 for r in results),
            "other_errors": sum(400 <= r["status"] < 500 for r in results),
            "lost": sum(not r["final"] for r in stayed), "duplicated": len(ids) - len(set(ids)), "rss_mb": memory}


def measure() -> dict:
    prompts = neutral_prompts()[:PROMPTS]
    server = Server("--parallel", str(PARALLEL))
    try:
        server.chat("Hi", {}, 0, 4)  # warm
        rounds = sorted(((batch_tok_s(prompts), serve_tok_s(server, prompts)) for _ in range(ROUNDS)),
                        key=lambda pair: pair[1] / pair[0])
        stress = load(server, prompts)
    finally:
        server.close()
    batch, served = rounds[ROUNDS // 2]
    return {"batch_tok_s": round(batch, 1), "serve_tok_s": round(served, 1), "ratio": round(served / batch, 3),
            "ratios": [round(s / b, 3) for b, s in rounds], "load": stress}


def rows(figures: dict) -> list[tuple[str, str, str]]:
    stress = figures["load"]
    return [
        (f"eqz batch --parallel {PARALLEL}, one mood", f"{figures['batch_tok_s']:.1f} tok/s", "baseline"),
        (f"eqz serve, {PARALLEL} clients, 8 moods", f"{figures['serve_tok_s']:.1f} tok/s",
         f"x{figures['ratio']:.2f} of batch, median of rounds {figures['ratios']} (target >= 0.9)"),
        (f"serve load: {stress['requests']} requests", f"{stress['server_errors']} 5xx",
         f"{stress['lost']} lost, {stress['duplicated']} duplicated, {stress['left_mid_stream']} left mid-stream; "
         f"RSS {' -> '.join(map(str, stress['rss_mb']))} MB"),
    ]


def main() -> dict:
    figures = measure()
    print_figures(f"eqz serve ({PROMPTS} prompts x {TOKENS} tokens; load: {LOAD_REQUESTS} requests)", rows(figures))
    return figures


if __name__ == "__main__":
    main()
