"""The README's command examples, run top to bottom as a user would type them (in an empty folder, with data and
config dirs of their own), so the README cannot drift from the tool again. The few lines too slow for the suite
say which test runs the same command on less data."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from .conftest import EQZ, random_direction_matrix
from eqz.vector_files import write_control_vector

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = {
    "eqz train --model": "needs a model the user downloads; test_bank trains Gemma 3 the same way (--quick)",
    "eqz train --band": "minutes; test_bank adds a described band the same way (--quick)",
    "eqz eval": "minutes on every held-out prompt; test_eval runs the same command on four",
}


def readme_commands() -> list[str]:
    """The lines of the README's "Commands, one example each" block, comments dropped."""
    section = README.read_text().split("## Commands, one example each", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if shlex.split(line, comments=True)]


def test_every_readme_command_runs_as_written(tmp_path, model):
    info = model.info
    (tmp_path / "prompts.txt").write_text("Tell me about the rain.\n")  # what the examples assume the user has
    write_control_vector(tmp_path / "repeng-happy.gguf",
                         random_direction_matrix(info.n_layer, info.n_embd, range(10, 20), norm=4.0), info.architecture)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "COLUMNS": "80", "PATH": f"{Path(EQZ).parent}{os.pathsep}{os.environ['PATH']}"}  # `eqz` is the one tested
    ran = skipped = 0
    for line in readme_commands():
        if any(line.startswith(prefix) for prefix in NOT_RUN):
            skipped += 1
            continue
        assert "eqz" in shlex.split(line, comments=True), line
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, input="Hello!\n/quit\n",
                              capture_output=True, text=True, timeout=300)  # by a shell: a line may pipe into eqz
        assert done.returncode == 0 and "error" not in done.stderr, f"{line}\n{done.stderr}"
        ran += 1
    assert ran >= 12 and skipped == len(NOT_RUN)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 10  # 1 prompt x 5 gains x 2 samples
