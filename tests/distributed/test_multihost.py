"""Multi-process training on 127.0.0.1 (gloo CPU collectives) and the launch scripts.

2 processes × 4 CPU devices must reproduce 1 process × 8 devices; a checkpoint written by 2
processes must continue on 1; a killed process must bring the other down with an error.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from bmx.data.prepare import PrepareSettings, prepare

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH = REPO_ROOT / "launch"


@pytest.fixture(scope="module")
def pmc_tokens(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("pmc") / "tokens"
    articles = sorted((shared_data / "pmc_oa" / "plos_allofplos" / "starter_corpus").glob("*.xml"))[:8]
    prepare([str(path) for path in articles], out, PrepareSettings(seq_len=64), progress=False)
    return out


def write_config(tmp_path: Path, pmc_tokens: Path, run_dir: Path, steps: int, every: int = 100) -> Path:
    """The quickstart config, shrunk so that 2 processes finish in seconds."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    config.update(run_dir=str(run_dir), data={"path": str(pmc_tokens)})
    config["model"]["overrides"] = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
    config["train"] = {"steps": steps, "global_batch_size": 8}
    # Warm-up covers the 5 steps the runs compare, so their learning rates agree whatever their lengths.
    config["schedule"]["warmup_steps"] = 5
    config["checkpoint"] = {"every": every, "keep": 5}
    config["logging"] = {"tensorboard": False, "progress": False}
    path = tmp_path / f"config-{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def environment(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def run_local_multiprocess(config: Path, processes: int = 2, *overrides: str) -> None:
    env = {**environment(4), "BMX_DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), str(processes), str(config), *overrides],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def run_single_process(config: Path, devices: int, *overrides: str) -> str:
    result = subprocess.run([sys.executable, "-m", "bmx.train", "--config", str(config), *overrides], cwd=REPO_ROOT,
                            env=environment(devices), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in
            map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_processes_match_one_process_and_their_checkpoint_continues_on_one(tmp_path, pmc_tokens):
    two = tmp_path / "two_processes"
    run_local_multiprocess(write_config(tmp_path, pmc_tokens, two, steps=6, every=3))
    # Restart from the 2-process checkpoint at step 3 in a single process with 8 devices: its steps 4-6
    # are computed by 1 process x 8 devices from the same state, so they must give the 2 x 4 losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("model", "6"))
    output = run_single_process(write_config(tmp_path, pmc_tokens, resumed, steps=6, every=3), devices=8)
    assert "resumed from step 3" in output
    two_losses, resumed_losses = losses(two), losses(resumed)
    assert sorted(two_losses) == list(range(1, 7)) and two_losses[6] < two_losses[1]
    np.testing.assert_allclose([resumed_losses[s] for s in (4, 5, 6)], [two_losses[s] for s in (4, 5, 6)], rtol=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_killing_one_process_stops_the_other_with_an_error(tmp_path, pmc_tokens):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, pmc_tokens, run_dir, steps=100000)
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**environment(4), "BMX_COORDINATOR": f"127.0.0.1:{port}", "BMX_NUM_PROCESSES": "2",
               "BMX_PROCESS_ID": str(rank)}
        command = [sys.executable, "-m", "bmx.train", "--config", str(config), "distributed.heartbeat_timeout_seconds=10"]
        processes.append(subprocess.Popen(command, cwd=REPO_ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in processes), "training did not start"
        time.sleep(0.5)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    output = processes[0].communicate(timeout=150)[0]
    assert time.time() - killed_at < 120
    assert processes[0].returncode != 0
    # The heartbeat notices first, or the collective fails and bmx says why, or (when the peer dies in
    # the middle of a CPU collective) gloo aborts the process itself: an error either way, never a hang.
    causes = ("heartbeat timeout", "another process probably died", "gloo::EnforceNotMet",
              "stopped sending heartbeats")  # JAX's coordination service may report it first
    assert any(cause in output for cause in causes), output[-2000:]


def test_launch_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert {script.name for script in scripts} >= {"tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run_prints_create_copy_install_and_train_on_all_workers():
    result = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "--name", "bio", "--zone", "us-east5-a", "--type",
                             "v5p-64", "--project", "my-project", "--config", "configs/biomistral_7b.yaml", "--create",
                             "--dry-run", "--", "train.steps=10"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create bio --zone us-east5-a --project my-project "
                               "--accelerator-type v5p-64")
    assert any("scp" in line and "--worker=all" in line for line in lines)
    train = lines[-1]
    assert "ssh bio" in train and "--worker=all" in train
    assert "python\\ -m\\ bmx.train\\ --config\\ configs/biomistral_7b.yaml\\ train.steps=10" in train


def test_slurm_dry_run_prints_one_srun_of_the_same_command():
    env = {**os.environ, "BMX_DRY_RUN": "1"}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "configs/biomistral_7b_h100x32.yaml",
                             "train.steps=3"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("srun --kill-on-bad-exit=1 python -m bmx.train --config "
                                     "configs/biomistral_7b_h100x32.yaml train.steps=3")


def test_local_multiprocess_dry_run_gives_each_process_its_rank(tmp_path):
    env = {**os.environ, "BMX_DRY_RUN": "1", "BMX_PORT": "5555"}
    result = subprocess.run(["bash", str(LAUNCH / "local_multiprocess.sh"), "3", "configs/quickstart.yaml",
                             "train.steps=2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert f"BMX_PROCESS_ID={rank}" in line and "BMX_NUM_PROCESSES=3" in line
        assert "BMX_COORDINATOR=127.0.0.1:5555" in line and line.rstrip().endswith("train.steps=2")


def test_incomplete_distributed_settings_are_an_error(monkeypatch):
    from bmx.distributed import DistributedConfig, initialize

    monkeypatch.setenv("BMX_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("BMX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("BMX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="num_processes, process_id missing"):
        initialize(DistributedConfig())
    assert initialize(DistributedConfig(coordinator_address="x:1", num_processes=1, process_id=0)) is False
