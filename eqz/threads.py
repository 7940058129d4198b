"""How many CPU threads llama.cpp gets when the user does not say (``--threads``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import EqzError
from .sampling import whole_number


def physical_cores() -> int:
    """Physical cores this process may use: llama.cpp decodes fastest with one thread per core."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def others_running(samples: int = 5, interval: float = 0.004) -> int:
    """Other threads on a CPU right now (Linux /proc/stat ``procs_running``, less the reading thread itself), the
    fewest seen over ``samples`` reads ~20 ms apart in all, so a momentary blip does not count but a busy job does.
    0 where the kernel does not say."""
    seen = []
    for index in range(samples):
        try:
            with open("/proc/stat", "rb") as handle:
                line = next(line for line in handle if line.startswith(b"procs_running"))
        except (OSError, StopIteration):
            return 0
        seen.append(int(line.split()[1]) - 1)
        if index < samples - 1:
            time.sleep(interval)
    return max(0, min(seen))


def default_threads() -> int:
    """llama.cpp threads when none are asked for: $EQZ_THREADS, else one per physical core that no other job is
    busy on. Its threads meet at a barrier many times per token, so one thread sharing a core with another job
    stalls all of them (benchmarks/under_load.py, 2 cores both busy: 2 threads took 83.5 s for 32 tokens, the
    default 3.0 s). The variable is for jobs started side by side, which would each see the others idle at load."""
    fixed = os.environ.get("EQZ_THREADS", "").strip()
    if fixed:
        count = whole_number(fixed)
        if count is None or count < 1:
            raise EqzError(f"EQZ_THREADS={fixed} is not a thread count; set it to a whole number >= 1, or unset it")
        return count
    return max(1, physical_cores() - others_running())


HINT_AFTER_TOKENS = 8  # a reply shorter than this says too little about speed to hint at anything


def crowding_hint(threads: int, reply_tokens: int) -> str | None:
    """A one-line hint after a reply of ``reply_tokens`` when other jobs now leave fewer free cores than llama.cpp
    has threads (they started after the model was loaded): its threads then wait on each other and tokens/s
    collapses."""
    if reply_tokens < HINT_AFTER_TOKENS:
        return None
    free = default_threads()
    if threads <= free:
        return None
    cores = physical_cores()
    return (f"other jobs now keep {cores - free} of {cores} cores busy and llama.cpp runs {threads} threads, which "
            f"stalls it; --threads {free} is faster while they run")
