"""Config files that include others: merge order, relative paths, and the errors a user can meet."""

from pathlib import Path

import pytest

from bmx.config_io import ConfigError, load_config, load_yaml
from bmx.train.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_included_keys_are_overridden_key_by_key(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  steps: 10\n  global_batch_size: 8\noptimizer:\n  learning_rate: 1.0e-3\n")
    child = write(tmp_path / "child.yaml", "include: base.yaml\ntrain:\n  steps: 3\n")
    assert load_yaml(child) == {"train": {"steps": 3, "global_batch_size": 8}, "optimizer": {"learning_rate": 1.0e-3}}


def test_later_includes_override_earlier_ones_and_paths_are_relative_to_the_includer(tmp_path):
    write(tmp_path / "recipes" / "a.yaml", "train:\n  steps: 1\n  global_batch_size: 4\n")
    write(tmp_path / "recipes" / "b.yaml", "include: a.yaml\ntrain:\n  steps: 2\n")
    write(tmp_path / "hw" / "c.yaml", "train:\n  global_batch_size: 16\n")
    child = write(tmp_path / "hw" / "run.yaml", "include: [../recipes/b.yaml, c.yaml]\nrun_dir: runs/x\n")
    assert load_yaml(child) == {"train": {"steps": 2, "global_batch_size": 16}, "run_dir": "runs/x"}


def test_overrides_apply_after_includes(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  steps: 10\n")
    child = write(tmp_path / "child.yaml", "include: base.yaml\n")
    assert load_config(RunConfig, child, ["train.steps=4"]).train.steps == 4


def test_an_include_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml(tmp_path / "a.yaml")


def test_a_missing_include_names_the_including_file(tmp_path):
    child = write(tmp_path / "child.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: include: nowhere\.yaml not found"):
        load_yaml(child)


@pytest.mark.parametrize("value", ["3", "[]", "{a: b}", "[base.yaml, 4]"])
def test_an_include_that_is_not_file_names_is_an_error(tmp_path, value):
    child = write(tmp_path / "child.yaml", f"include: {value}\n")
    with pytest.raises(ConfigError, match="include: expected a file name or a list of file names"):
        load_yaml(child)


def test_an_unknown_key_in_an_included_file_is_still_reported_with_the_valid_keys(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  stepz: 10\n")
    child = write(tmp_path / "child.yaml", "include: base.yaml\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz; valid keys here: .*train\.steps"):
        load_config(RunConfig, child)


@pytest.mark.parametrize("text, message", [
    ("train: !!python/object/apply:os.system [echo hi]\n", r"bad\.yaml: not valid YAML \(line 1, column 8\)"),
    ("train:\n  steps: [1, 2\n", r"bad\.yaml: not valid YAML \(line 3"),
])
def test_yaml_that_cannot_be_read_is_one_line_naming_the_file(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_yaml(path)
    assert "\n" not in str(raised.value)


def test_the_hardware_configs_state_only_what_differs_from_the_recipe():
    recipe = load_config(RunConfig, REPO_ROOT / "configs" / "biomistral_7b.yaml")
    for name in ("biomistral_7b_v5p_64", "biomistral_7b_v5p_128", "biomistral_7b_v5e_256", "biomistral_7b_h100x8",
                 "biomistral_7b_h100x32", "biomistral_7b_tpu_v5p"):
        path = REPO_ROOT / "configs" / f"{name}.yaml"
        assert "include:" in path.read_text()
        config = load_config(RunConfig, path)
        assert config.optimizer == recipe.optimizer and config.schedule == recipe.schedule, name
        assert (config.train.steps, config.train.global_batch_size) == (1075, 2048), name
        assert config.model.remat == "full" and config.model.param_dtype == "float32", name
