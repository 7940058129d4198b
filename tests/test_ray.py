"""``eqz batch --ray`` on a real Ray cluster on loopback: a head started with ``ray start`` and two worker processes,
each holding the default model. The file must be the local ``--parallel 1`` file byte for byte, also after a
worker is killed mid-run and after the driver is interrupted and resumed."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import eqz
from eqz.errors import EqzError

from .conftest import EQZ, run_eqz
from .test_batch import PROMPTS

# after `make test`'s parallel run, alone: a cluster of two one-CPU workers beside another test worker on two
# cores starved Ray's own processes until its raylet was declared dead (once in a fresh clone's run); and `ray
# stop --force` and `pgrep ray::` see every Ray process on the machine, `--ray auto` joins any cluster it finds
pytestmark = [pytest.mark.slow, pytest.mark.serial]

RAY = str(Path(sys.executable).parent / "ray")
# Ray's switch for a one-machine cluster: every Ray process here (head, workers, drivers) listens and talks on
# 127.0.0.1 only, not on the machine's network address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# A token of the test's own for every Ray process it starts: Ray >= 2.5x turns token authentication on by itself once
# any local cluster has written ~/.ray/auth_token, and processes that disagree about it cannot talk.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
SWEEP = ["--sweep", "joy=-1:1:3", "--samples", "2", "--seed", "5", "-n", "24"]  # 6 prompts x 3 x 2 = 36 rows


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with two CPUs (two workers of one thread each); stopped after the module."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="eqz-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                              "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                             capture_output=True, text=True, timeout=180, env={**os.environ, **env})
    assert started.returncode == 0, started.stderr[-2000:]
    yield f"127.0.0.1:{port}"
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def local_file(prompts, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ray-local") / "local.jsonl"
    result = run_eqz("batch", str(prompts), "-o", str(out), *SWEEP, "--parallel", "1")
    assert result.returncode == 0, result.stderr
    return out.read_text()


def ray_command(prompts: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [EQZ, "batch", str(prompts), "-o", str(out), *SWEEP, "--parallel", "2", "--ray", address,
            "--workers", "2", *extra]


def wait_for_rows(path: Path, count: int, process: subprocess.Popen, seconds: float = 180) -> int:
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            break
        time.sleep(0.05)
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_cluster_eqz_starts_listens_on_loopback_only(prompts, tmp_path):
    """Runs before the module's cluster exists (tests run in file order), so --ray auto starts one. The switch that keeps it on loopback is
    read when ray is imported, and the CLI had imported ray before setting it: every Ray process listened on all
    interfaces, with no authentication. The environment here leaves the switch out, as a user's does."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    process = subprocess.Popen([EQZ, "batch", str(prompts), "-o", str(tmp_path / "out.jsonl"), "-n", "24",
                                "--ray", "auto", "--workers", "1"], stderr=subprocess.PIPE, text=True, env=env)
    listening: set[str] = set()  # every Ray listener seen while the run lasts (workers and agents come later)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        listening |= {line for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
                      .splitlines() if any(name in line for name in ('"raylet"', '"gcs_server"', '"ray::'))}
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert any("raylet" in line for line in listening), listening
    addresses = [line.split()[3] for line in listening]
    assert all(address.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for address in addresses), listening


def test_a_bad_or_silent_address_and_too_many_workers_are_one_line(cluster, prompts, tmp_path):
    for address, said in (("nonsense", "--ray takes auto or a cluster's HOST:PORT"),
                          ("127.0.0.1:1", "nothing answers at 127.0.0.1:1")):
        result = run_eqz("batch", str(prompts), "-o", str(tmp_path / "x.jsonl"), "--ray", address)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "x.jsonl").exists()  # said before the model loads, no file left behind
    # the cluster has 2 CPUs: Ray would wait for a third for ever
    result = run_eqz("batch", str(prompts), "-o", str(tmp_path / "y.jsonl"), "--ray", cluster, "--workers", "3")
    assert result.returncode == 2 and "need 3 CPUs and the cluster has 2 free" in result.stderr, result.stderr[-2000:]
    plan = eqz.load().batch(prompts, tmp_path / "z.jsonl")
    with pytest.raises(EqzError, match="workers must be a whole number of at least 1"):
        plan.run_on_ray(cluster, workers=-1)  # reported success with no row written


def test_a_sweep_on_ray_writes_the_local_file(cluster, prompts, local_file, tmp_path):
    out = tmp_path / "ray.jsonl"
    result = subprocess.run(ray_command(prompts, out, cluster), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "36 rows written" in result.stderr
    assert out.read_text() == local_file


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(cluster, prompts, local_file, tmp_path):
    out = tmp_path / "killed.jsonl"
    process = subprocess.Popen(ray_command(prompts, out, cluster), stderr=subprocess.PIPE, text=True)
    written = wait_for_rows(out, 2, process)
    workers = subprocess.run(["pgrep", "-f", "ray::BatchWorker"], capture_output=True, text=True).stdout.split()
    assert process.poll() is None and 2 <= written < 36 and len(workers) == 2, (written, workers)
    subprocess.run(["kill", "-9", workers[0]], check=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "a Ray worker stopped; its unfinished rows go to a new worker" in stderr
    assert out.read_text() == local_file


def test_an_interrupted_driver_resumes_to_the_local_file(cluster, prompts, local_file, tmp_path):
    out = tmp_path / "cut.jsonl"
    process = subprocess.Popen(ray_command(prompts, out, cluster), stderr=subprocess.PIPE, text=True)
    written = wait_for_rows(out, 4, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and 4 <= written < 36, stderr[-3000:]
    kept = len(out.read_text().splitlines())
    resumed = subprocess.run(ray_command(prompts, out, cluster, "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({kept} already there)" in resumed.stderr
    assert out.read_text() == local_file


def test_a_node_without_the_model_is_named(cluster, prompts, tmp_path):
    """The driver loads a copy of the model and the copy goes before the workers start: no node has the file."""
    copy = tmp_path / "model.gguf"
    shutil.copy(eqz.load().model.path, copy)
    loaded = eqz.load(copy)
    copy.unlink()
    plan = loaded.batch(prompts, tmp_path / "out.jsonl", sampling={"max_tokens": 8})
    with pytest.raises(EqzError) as caught:
        plan.run_on_ray(cluster, workers=1)
    message = str(caught.value)
    assert message.startswith("worker on node ") and "127.0.0.1" in message and str(copy) in message
    assert "every node needs the model at the same path" in message
    loaded.close()


def test_workers_without_ray_is_one_line(prompts, tmp_path):
    result = run_eqz("batch", str(prompts), "-o", str(tmp_path / "x.jsonl"), "--workers", "2")
    assert result.returncode != 0 and "--workers is for --ray" in result.stderr and "Traceback" not in result.stderr
