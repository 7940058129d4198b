"""The default thread count leaves out the cores other jobs are busy on (llama.cpp's threads stall when one of
them shares a core), measured, not assumed: real busy processes beside it."""

from __future__ import annotations

import subprocess
import sys

from eqz.threads import default_threads, physical_cores


def test_default_threads_leave_out_cores_that_other_jobs_keep_busy():
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(physical_cores())]
    try:
        assert default_threads() == 1  # every core is taken: one thread, not a stalled crowd
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
