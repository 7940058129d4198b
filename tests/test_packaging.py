"""eqz as an installed tool: the wheel carries the shipped bank and presets, and works from a fresh venv outside
the checkout (what `pip install .` and `pipx install .` give)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and runs the real model (the fast tier: pytest -m 'not slow')

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_bank_and_presets_and_runs_outside_the_checkout(tmp_path):
    # built from a copy: pip builds a local folder in place, and build/lib kept modules deleted since (a later wheel
    # would carry them) besides leaving build/ and eqz.egg-info in the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", "*.so", "docs"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("eqz-*.whl"))
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install",
                                "-q", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    # eqz's dependencies (llama.cpp took minutes to build) come from this venv through a path entry; eqz itself
    # only from the wheel: this venv's editable-install hook lives in a .pth file, which path entries do not run
    site = Path(subprocess.run([str(fresh / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "eqz-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("EQZ_VECTORS", None)

    def eqz(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(fresh / "bin" / "eqz"), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    banks = json.loads(eqz("vectors", "list", "--json").stdout)
    assert [Path(bank["path"]).parent.name for bank in banks] == ["shipped_vectors"]
    assert str(site) in banks[0]["path"] and len(banks[0]["bands"]) == 10
    presets = json.loads(eqz("presets", "list", "--json").stdout)
    assert {"anxious", "curious", "melancholy", "serene"} <= {preset["name"] for preset in presets}
    reply = eqz("generate", "Hi", "--preset", "melancholy", "-n", "8", "--json")
    assert reply.returncode == 0 and json.loads(reply.stdout)["preset"] == "melancholy", reply.stderr
