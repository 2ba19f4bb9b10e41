"""`bmx.train`: same losses on every mesh, exact resume after SIGKILL, clean SIGTERM, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bmx.config_io import ConfigError, load_config
from bmx.data.prepare import PrepareSettings, prepare
from bmx.train.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
FULL_TESTS = os.environ.get("BMX_FULL_TESTS") == "1"
MODEL = {"preset": "tiny", "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                         "sliding_window": 16}}


@pytest.fixture(scope="module")
def pmc_tokens(tmp_path_factory, shared_data):
    """Real PMC articles packed into 64-token sequences (the paper's recipe, shorter)."""
    out = tmp_path_factory.mktemp("pmc") / "tokens"
    articles = sorted((shared_data / "pmc_oa" / "plos_allofplos" / "starter_corpus").glob("*.xml"))[:12]
    manifest = prepare([str(path) for path in articles], out, PrepareSettings(seq_len=64, val_fraction=0.25),
                       progress=False)
    assert manifest["documents"] == 12
    return out


def run_config(tmp_path, pmc_tokens, **sections) -> dict:
    config = {"run_dir": str(tmp_path / "run"), "model": MODEL, "data": {"path": str(pmc_tokens)},
              "train": {"steps": 5, "global_batch_size": 8}, "optimizer": {"learning_rate": 1e-3},
              "checkpoint": {"every": 100}, "logging": {"tensorboard": False, "progress": False}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_mesh_gives_the_single_device_losses(tmp_path, pmc_tokens):
    import jax

    from bmx.config_io import from_dict
    from bmx.train.loop import train

    assert jax.device_count() == 8
    # The mixed mesh uses every axis; the others (one axis of all 8 devices, fsdp 4 x tensor 2) only at full size.
    meshes = {"single": None, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
    if FULL_TESTS:
        meshes.update(fsdp4_tensor2={"fsdp": 4, "tensor": 2}, data8={"data": 8, "fsdp": 1}, fsdp8={"fsdp": 8})
    results = {}
    for name, mesh in meshes.items():
        values = run_config(tmp_path / name, pmc_tokens)
        config = from_dict(RunConfig, values)
        if mesh is None:
            train(config, devices=jax.devices()[:1])
        else:
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
            train(config)
        results[name] = losses(config.run_dir)
    reference = np.array(results.pop("single"))
    assert len(reference) == 5 and reference[-1] < reference[0]
    for name, values in results.items():
        np.testing.assert_allclose(values, reference, rtol=1e-5, err_msg=name)


def write_config(tmp_path, values) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def start_training(config_path, *overrides) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "bmx.train", "--config", str(config_path), *overrides],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("training did not reach the step in time")


def final_params(run_dir: Path):
    from bmx.model.checkpoint import read_params

    import jax

    return {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(read_params(run_dir / "model"))}


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_bit_identical_parameters(tmp_path, pmc_tokens):
    steps = {"steps": 8, "global_batch_size": 4}
    (tmp_path / "a").mkdir()
    straight = write_config(tmp_path / "a", run_config(tmp_path / "a", pmc_tokens, train=steps))
    interrupted_dir = tmp_path / "b"
    interrupted_dir.mkdir()
    interrupted = write_config(interrupted_dir, run_config(interrupted_dir, pmc_tokens, train=steps,
                                                           checkpoint={"every": 2, "async_save": True}))
    reference = start_training(straight)
    victim = start_training(interrupted)
    wait_for_step(interrupted_dir / "run", 5, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    resumed = start_training(interrupted)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from step" in output
    expected, actual = final_params(tmp_path / "a" / "run"), final_params(interrupted_dir / "run")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert np.array_equal(expected[name], actual[name]), name
    assert [json.loads(line)["step"] for line in (interrupted_dir / "run" / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_and_a_corrupt_checkpoint_is_skipped(tmp_path, pmc_tokens):
    config = write_config(tmp_path, run_config(tmp_path, pmc_tokens, train={"steps": 200, "global_batch_size": 4},
                                               checkpoint={"every": 2}))
    process = start_training(config)
    wait_for_step(tmp_path / "run", 5, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = sorted(int(path.name) for path in checkpoints.iterdir() if path.name.isdigit())
    latest = saved[-1]
    assert latest >= 5  # the step reached when SIGTERM arrived was saved, not only the last periodic one
    # Corrupt the newest checkpoint: the next run warns, skips it and resumes from the one before.
    for file in (checkpoints / str(latest) / "params").rglob("*"):
        if file.is_file() and "ocdbt" in str(file):
            file.write_bytes(b"garbage")
    resumed = start_training(config, "train.steps=" + str(latest + 1))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"checkpoint at step {latest}" in output and "skipped" in output
    assert f"resumed from step {saved[-2]}" in output


def test_unknown_keys_and_wrong_types_are_errors_listing_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz; valid keys here: .*train\.steps"):
        load_config(RunConfig, None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_config(RunConfig, None, ["train.steps=many"])
    config = load_config(RunConfig, REPO_ROOT / "configs" / "quickstart.yaml", ["train.steps=17", "init.from=/ckpt"])
    assert config.train.steps == 17 and config.init.from_ == "/ckpt"


def test_shipped_configs_parse():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(RunConfig, path)


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bmx.train", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"),
                             "optimizer.lr=1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key optimizer.lr; valid keys here:" in result.stderr and "Traceback" not in result.stderr


def test_quickstart_config_learns_real_pmc_text_and_exports_to_transformers(tmp_path, pmc_tokens):
    from transformers import MistralForCausalLM

    from bmx.train.loop import train

    config = load_config(RunConfig, REPO_ROOT / "configs" / "quickstart.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.path={pmc_tokens}", "train.steps=12", "train.eval_every=6",
        "schedule.warmup_steps=2", "logging.progress=false", "logging.tensorboard=true",
        f"export_hf={tmp_path / 'hf'}"])
    result = train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, 13))
    first, last = records[0]["loss"], np.mean([record["loss"] for record in records[-3:]])
    assert last < first - 0.5, (first, last)
    assert {"tokens_per_second", "mfu", "lr", "grad_norm"} <= set(records[-1])
    assert records[-1]["eval_loss"] < records[5]["eval_loss"] and result["eval_perplexity"] > 1
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    MistralForCausalLM.from_pretrained(tmp_path / "hf")
