"""Shared fixtures: the real default model, the Gemma test model, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from eqz.engine import Model
from eqz.models import default_model_path
from eqz.vector_files import write_control_vector

# Tests never read or write the real user's presets, banks and chats.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="eqz-test-config-")
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="eqz-test-data-")
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="eqz-test-state-")  # the conversations eqz chat keeps
# A run started in the background (`make test &` from a script) inherits an ignored SIGINT, and every eqz it starts
# would too (Python keeps an inherited SIG_IGN); the tests that press Ctrl-C need it delivered. A handler here
# becomes the default disposition in the children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Under pytest-xdist (make test) each worker, and every eqz it starts, runs llama.cpp on one thread: a worker would
# otherwise see the other idle when it loads a model and take every core, and both would stall (eqz.threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("EQZ_THREADS", "1")

GEMMA_PATH = Path(sys.prefix) / "share" / "eqz" / "models" / "gemma-3-270m-q4_k_m.gguf"
EQZ = str(Path(sys.executable).parent / "eqz")


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = default_model_path()
    assert path is not None, "the default model is not installed: run `make setup`"
    return path


@pytest.fixture(scope="session")
def model(model_path) -> Model:
    with Model(model_path) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    assert GEMMA_PATH.exists(), f"{GEMMA_PATH} is missing: run `make setup`"
    return GEMMA_PATH


def random_direction_matrix(n_layer: int, n_embd: int, layers: range, norm: float, seed: int = 0) -> np.ndarray:
    """A control vector that certainly changes the output: one random unit direction per layer, times norm."""
    rng = np.random.default_rng(seed)
    matrix = np.zeros((n_layer, n_embd), dtype=np.float32)
    for layer in layers:
        direction = rng.standard_normal(n_embd)
        matrix[layer] = norm * direction / np.linalg.norm(direction)
    return matrix


@pytest.fixture(scope="session")
def random_vector_file(tmp_path_factory, model) -> Path:
    info = model.info
    matrix = random_direction_matrix(info.n_layer, info.n_embd, range(3, 20), norm=40.0)
    return write_control_vector(tmp_path_factory.mktemp("vectors") / "random.gguf", matrix, info.architecture)


def save_and_leave(child, path: Path, saved: str, leave: str = "/quit") -> dict:
    """In a pexpect chat: /save the transcript to ``path``, leave (``/quit``, or Ctrl-D with leave="ctrl-d"),
    check the exit was clean, and return the transcript."""
    import pexpect

    child.sendline(f"/save {path}")
    child.expect_exact(saved)
    if leave == "ctrl-d":
        child.sendcontrol("d")
    else:
        child.sendline(leave)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return json.loads(path.read_text())


# a refusal "before training" comes in seconds; one after it started would take minutes and time out
BEFORE_TRAINING = 60


def run_eqz(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300,
            file_size_limit: int | None = None):
    """Run the installed ``eqz`` command as a user would; returns the CompletedProcess. ``file_size_limit``: bytes
    any file it writes may grow to, which cuts writes short as a full disk does."""
    import resource

    full_env = {**os.environ, **(env or {})}
    limit = None if file_size_limit is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY)))
    return subprocess.run(
        [EQZ, *args], input=input, capture_output=True, text=True, env=full_env, timeout=timeout, preexec_fn=limit
    )
