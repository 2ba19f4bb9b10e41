"""`bmx.train` under bad configs and faults: one line naming the key or file (exit 2), nothing lost.

Run directories with checkpoints are made without training (zero parameters saved through the
trainer's own checkpointing), so each refusal is checked in seconds; what is under test is how a
re-run treats them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from bmx.config_io import ConfigError, from_dict, load_config, to_dict
from bmx.data.prepare import PrepareSettings, prepare
from bmx.train.__main__ import main as train_cli
from bmx.train.config import NUMERIC_RANGES, RunConfig, numeric_fields

MODEL = {"preset": "tiny", "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                         "sliding_window": 16}}


@pytest.fixture(scope="module")
def pmc_tokens(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("pmc") / "tokens"
    articles = sorted((shared_data / "pmc_oa" / "plos_allofplos" / "starter_corpus").glob("*.xml"))[:2]
    prepare([str(path) for path in articles], out, PrepareSettings(seq_len=64, val_fraction=0.0), progress=False)
    return out


def run_values(run_dir, data, **sections) -> dict:
    values = {"run_dir": str(run_dir), "model": MODEL, "data": {"path": str(data)},
              "train": {"steps": 2, "global_batch_size": 8}, "checkpoint": {"every": 1, "keep": 3},
              "logging": {"tensorboard": False, "progress": False}}
    for section, changes in sections.items():
        values[section] = {**values[section], **changes} if isinstance(changes, dict) else changes
    return values


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def cli_error(capsys, *argv) -> str:
    """Run the CLI in this process; its error: exit 2, one line, no traceback."""
    assert train_cli(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ---- item 4: every numeric field is range-checked when the config is loaded -----------------------

def test_every_numeric_config_field_has_a_range():
    assert set(numeric_fields(to_dict(RunConfig()))) <= set(NUMERIC_RANGES)


@pytest.mark.parametrize("override, message", [
    ("train.steps=-3", "train.steps: -3 is out of range (expected ≥ 1)"),
    ("train.global_batch_size=0", "train.global_batch_size: 0 is out of range"),
    ("optimizer.learning_rate=-1e-4", "optimizer.learning_rate: -0.0001 is out of range (expected > 0)"),
    ("optimizer.b2=1.5", "optimizer.b2: 1.5 is out of range (expected in [0, 1))"),
    ("schedule.warmup_steps=51", "schedule.warmup_steps: 51 is more than train.steps 50"),
    ("train.eval_every=-1", "train.eval_every: -1 is out of range"),
    ("checkpoint.every=0", "checkpoint.every: 0 is out of range (expected ≥ 1)"),
    ("mesh.tensor=0", "mesh.tensor: 0 is out of range (expected ≥ 1, or -1 for the remaining devices)"),
    ("train.grad_accumulation=3", "train.global_batch_size: 8 is not a multiple of train.grad_accumulation 3"),
])
def test_out_of_range_numbers_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace(".", r"\.")):
        load_config(RunConfig, Path(__file__).parents[2] / "configs" / "quickstart.yaml", [override])


def test_yaml_errors_and_python_tags_are_one_line_naming_the_file(tmp_path, capsys):
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    assert f"bmx train: error: {tagged}: not valid YAML" in cli_error(capsys, "--config", str(tagged))
    assert not (tmp_path / "pwned").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1, 2\n")
    assert f"bmx train: error: {broken}: not valid YAML (line 3" in cli_error(capsys, "--config", str(broken))
    good = write_yaml(tmp_path / "good.yaml", run_values(tmp_path / "run", tmp_path))
    assert "bmx train: error: override 'train.steps=[1': not valid YAML" in cli_error(
        capsys, "--config", str(good), "train.steps=[1")


# ---- bad data, devices and run directories: refused before any setup ---------------------------------

def test_missing_empty_or_unset_data_is_one_line(tmp_path, capsys, pmc_tokens):
    config = write_yaml(tmp_path / "c.yaml", run_values(tmp_path / "run", tmp_path / "nowhere"))
    assert f"{tmp_path / 'nowhere' / 'manifest.json'} not found" in cli_error(capsys, "--config", str(config))
    assert "bmx train: error: data.path: not set" in cli_error(capsys, "--config", str(config), "data.path=")
    empty = tmp_path / "empty"  # one short text: fewer tokens than one sequence
    (tmp_path / "short.txt").write_text("Aspirin inhibits cyclooxygenase.")
    prepare([str(tmp_path / "short.txt")], empty, PrepareSettings(seq_len=64), progress=False)
    assert "data.path: the train split of" in cli_error(capsys, "--config", str(config), f"data.path={empty}")
    assert not (tmp_path / "run" / "model").exists()


def test_a_batch_the_data_parallel_devices_cannot_share_is_refused(tmp_path, capsys, pmc_tokens):
    config = write_yaml(tmp_path / "c.yaml", run_values(tmp_path / "run", pmc_tokens, train={"global_batch_size": 6}))
    error = cli_error(capsys, "--config", str(config), "mesh.data=4", "mesh.fsdp=2")
    assert "train.global_batch_size: 6 is not divisible by the 8 data-parallel devices" in error


@pytest.fixture
def small_disk(tmp_path):
    """Mounts tmpfs filesystems for the test (root only): `small_disk(size, read_only=False)`."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_a_read_only_run_dir_is_one_line(tmp_path, capsys, pmc_tokens, small_disk):
    read_only = small_disk("1m", read_only=True)
    config = write_yaml(tmp_path / "c.yaml", run_values(read_only / "run", pmc_tokens))
    assert f"bmx train: error: run_dir {read_only / 'run'} is not writable (Read-only file system)" in cli_error(
        capsys, "--config", str(config))


# ---- item 5: a re-run with another shape is refused; only unreadable checkpoints are quarantined --------

def saved_run(values: dict, steps: tuple[int, ...], full_size: bool = False) -> RunConfig:
    """A run directory as `train` leaves it after `steps`: config.yaml, metrics.jsonl, checkpoints of
    zero parameters and optimizer state (stored sparsely), or random ones taking their full size."""
    import jax
    import jax.numpy as jnp

    from bmx.data.loader import make_loader
    from bmx.train import checkpointing, loop
    from bmx.train.setup import build

    config = from_dict(RunConfig, values)
    run_dir = Path(config.run_dir)
    resolved = loop._check_and_record(config, run_dir)
    setup = build(config, devices=jax.devices()[:1])

    def fill(leaf):
        if full_size and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.device_put(jax.random.normal(jax.random.key(0), leaf.shape, leaf.dtype), leaf.sharding)
        return jnp.zeros(leaf.shape, leaf.dtype, device=leaf.sharding)

    def filled(tree):
        return jax.tree.map(fill, tree)

    params, opt_state = filled(setup.trainable.abstract_params), filled(setup.abstract_opt_state)
    loader = make_loader(config.data.path, global_batch_size=config.train.global_batch_size, seed=0,
                         process_index=0, process_count=1)
    manager = checkpointing.make_manager(run_dir, config.checkpoint)
    for step in steps:
        checkpointing.save(manager, step, params, opt_state, loader.get_state(),
                           {"config": resolved, "model": setup.model_config.to_dict()}, force=True)
    checkpointing.wait_until_finished(manager)
    manager.close()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n"
                                                   for s in range(1, max(steps) + 1)))
    return config


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_changed_architecture_is_refused_naming_the_keys_and_nothing_is_touched(tmp_path, capsys, pmc_tokens):
    import jax

    from bmx.train.checkpointing import RunMismatch
    from bmx.train.loop import train

    values = run_values(tmp_path / "run", pmc_tokens)
    saved_run(values, steps=(1, 2))
    before = listing(tmp_path / "run")
    changed = write_yaml(tmp_path / "changed.yaml", values)
    error = cli_error(capsys, "--config", str(changed), "model.overrides.intermediate_size=96")
    assert f"run_dir: {tmp_path / 'run'} holds a run of another shape (model.overrides:" in error
    assert "'intermediate_size': 128" in error and "'intermediate_size': 96" in error
    assert listing(tmp_path / "run") == before  # no quarantine, no restart, metrics.jsonl as it was
    # Without config.yaml the checkpoints' own record of the architecture stops the run just the same.
    (tmp_path / "run" / "config.yaml").unlink()
    config = from_dict(RunConfig, {**values, "model": {**MODEL, "overrides": {**MODEL["overrides"],
                                                                              "intermediate_size": 96}}})
    with pytest.raises(RunMismatch, match=r"step 2 .* another run shape \(model.intermediate_size: 128 → 96"):
        train(config, devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "corrupt_checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2"]


def test_only_an_unreadable_checkpoint_is_quarantined_and_metrics_history_is_kept(tmp_path, pmc_tokens):
    import jax

    from bmx.train.loop import train

    values = run_values(tmp_path / "run", pmc_tokens)
    config = saved_run(values, steps=(1, 2))
    run_dir = tmp_path / "run"
    history = (run_dir / "metrics.jsonl").read_text()
    for file in (run_dir / "checkpoints" / "2" / "params").rglob("*"):
        if file.is_file() and "ocdbt" in str(file):
            file.write_bytes(b"garbage")
    config.train.steps = 1  # step 1 restores and is the last: nothing to train, the model is written
    assert train(config, devices=jax.devices()[:1])["step"] == 1
    quarantined = list((run_dir / "corrupt_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in quarantined] == ["2"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1"]
    kept = list(run_dir.glob("metrics.until-step-2.*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == history  # the lines past step 1 are not lost
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run_dir / "model" / "bmx_checkpoint.json").is_file()


# ---- a full disk while saving ----------------------------------------------------------------------

def test_a_full_disk_while_saving_is_one_error_naming_the_directory_and_the_last_checkpoint_is_kept(small_disk):
    import jax
    import numpy as np

    from bmx.train import checkpointing

    disk = small_disk("3m")
    manager = checkpointing.make_manager(disk / "run", checkpointing.CheckpointConfig(every=1, async_save=True))
    params = {"kernel": jax.device_put(np.random.default_rng(0).standard_normal((256, 1024), np.float32))}  # 1 MiB
    state = {"mu": params["kernel"] + 1}
    checkpointing.save(manager, 1, params, state, {"next_index": 1}, {"config": {}}, force=True)
    checkpointing.wait_until_finished(manager)
    with pytest.raises(OSError, match=rf"writing a checkpoint to {disk / 'run' / 'checkpoints'} failed \(no space "
                                      r"left on device\); the newest complete checkpoint is kept") as raised:
        checkpointing.save(manager, 2, params, state, {"next_index": 2}, {"config": {}}, force=True)
        checkpointing.wait_until_finished(manager)  # an asynchronous save reports its failure here
    assert raised.value.errno == 28
    checkpointing.close_quietly(manager)
    assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
