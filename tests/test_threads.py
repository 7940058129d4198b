"""The default thread count leaves out the cores other jobs are busy on (llama.cpp's threads stall when one of
them shares a core), measured, not assumed: real busy processes beside it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eqz.errors import EqzError
from eqz.threads import default_threads, physical_cores

from .conftest import run_eqz


@pytest.mark.serial  # it keeps every core busy
def test_default_threads_leave_out_cores_that_other_jobs_keep_busy(monkeypatch):
    monkeypatch.delenv("EQZ_THREADS", raising=False)  # the suite may fix it (make test runs two workers)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(physical_cores())]
    try:
        assert default_threads() == 1  # every core is taken: one thread, not a stalled crowd
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_eqz_threads_fixes_the_count_for_jobs_started_side_by_side(monkeypatch):
    """Jobs started together each see the others idle when they load, and would all take every core."""
    monkeypatch.setenv("EQZ_THREADS", "3")
    assert default_threads() == 3
    for wrong in ("0", "two", "-1", "²"):  # "²" is a digit to str.isdigit, and int() raised
        monkeypatch.setenv("EQZ_THREADS", wrong)
        with pytest.raises(EqzError, match=f"EQZ_THREADS={wrong} is not a thread count"):
            default_threads()
    ran = run_eqz("generate", "Hi", "-n", "1", env={"EQZ_THREADS": "0"})  # one line and exit 2, before any model
    assert ran.returncode == 2 and ran.stderr.startswith("eqz: error: EQZ_THREADS=0 is not a thread count"), ran.stderr


@pytest.mark.serial  # it keeps every core busy
def test_a_hint_names_the_thread_count_that_fits_when_other_jobs_crowd_the_cores():
    from eqz.threads import crowding_hint

    cores = physical_cores()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        hint = crowding_hint(cores + 1, reply_tokens=32)
        assert hint is not None and "--threads 1" in hint
        assert crowding_hint(1, reply_tokens=32) is None  # one thread has no one to wait for
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@pytest.mark.slow
@pytest.mark.serial  # it stalls llama.cpp on crowded cores for seconds: alone, not beside another worker's tests
def test_generate_names_the_thread_count_that_fits_when_the_cores_are_crowded():
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(1, physical_cores() - 1))]
    try:
        ran = run_eqz("generate", "Describe your morning.", "-n", "12", "--temperature", "0",
                      "--threads", str(physical_cores() + 1))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert ran.returncode == 0 and "tok/s: other jobs now keep" in ran.stderr and "--threads 1 is faster" in ran.stderr
