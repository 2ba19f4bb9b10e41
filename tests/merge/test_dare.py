"""DARE: equal to mergekit given the same drop masks; seeded masks are Bernoulli(density), rescaled, reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmx.convert.safetensors_io import SafetensorsReader
from bmx.merge import SeededDropMasks, load_merge_config, run_merge
from bmx.merge.method_specs import method_spec
from bmx.merge.methods import drop_random
from bmx.merge.plan import plan_merge
from bmx.merge.run import _read_inputs, open_models
from bmx.merge.tensor_merge import merge_tensor
from merge.merge_testing import InjectedMasks, assert_same_tensors, inject_into_mergekit, run_mergekit, write_config

NON_BASE = ["tuned_a", "tuned_b", "other"]


def dare_config(method: str, parameters: dict) -> dict:
    return {
        "models": [
            {"model": "base"},
            {"model": "tuned_a", "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": "tuned_b", "parameters": {"density": [0.2, 0.9], "weight": 0.3}},
            {"model": "other", "parameters": {"density": 0.7, "weight": [0.1, 0.4]}},
        ],
        "merge_method": method,
        "base_model": "base",
        "parameters": parameters,
        "dtype": "float32",
    }


@pytest.mark.parametrize(
    "method, parameters",
    [
        ("dare_ties", {"int8_mask": True}),
        ("dare_ties", {"normalize": True, "lambda": 1.3}),
        ("dare_linear", {}),
        ("dare_linear", {"rescale": False, "normalize": True}),
    ],
    ids=["ties-int8", "ties-normalize-lambda", "linear", "linear-no-rescale"],
)
def test_dare_matches_mergekit_with_the_same_masks(tiny_models, tmp_path, monkeypatch, method, parameters):
    base = SafetensorsReader(tiny_models / "base")
    masks = InjectedMasks([(n, base.spec(n).shape) for n in base.names()], inputs=len(NON_BASE))
    config = dare_config(method, parameters)
    run_merge(write_config(tiny_models / f"{tmp_path.name}.yaml", config), tmp_path / "bmx", drop_masks=masks)
    inject_into_mergekit(monkeypatch, masks)
    run_mergekit(config, tiny_models, tmp_path / "mergekit")
    assert len(masks.used) == len(base.names()) * len(NON_BASE)
    assert_same_tensors(tmp_path / "bmx", tmp_path / "mergekit")


def test_seeded_masks_keep_density_fraction_and_rescale_like_mergekit():
    import torch
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

    shape, density = (300, 400), 0.3
    delta = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    keep = SeededDropMasks(seed=5)("model.layers.0.mlp.up_proj.weight", 0, shape, density)
    kept_fraction = float(jnp.mean(keep))
    tolerance = 5 * np.sqrt(density * (1 - density) / keep.size)
    assert abs(kept_fraction - density) < tolerance

    dropped = np.asarray(drop_random(jnp.asarray(delta), keep, rescale=True))
    reference = rescaled_masked_tensor(torch.from_numpy(delta), torch.from_numpy(np.array(keep)).float(), RescaleNorm.l1)
    np.testing.assert_allclose(dropped, reference.numpy(), rtol=1e-6, atol=1e-7)
    assert np.all(dropped[~np.asarray(keep)] == 0)
    scale = dropped[np.asarray(keep)] / delta[np.asarray(keep)]
    assert np.allclose(scale, scale[0]) and scale[0] == pytest.approx(1 / density, rel=0.02)


def test_masks_look_independent_between_entries_rows_inputs_and_densities():
    """The counter hash must not leave structure a drop pattern would inherit: neighbouring entries,
    rows, two inputs of one tensor and two tensors are uncorrelated, and a per-entry density (DELLA)
    is honoured entry by entry (checked in bands of equal density)."""
    masks = SeededDropMasks(seed=2)
    shape = (1000, 1200)
    first = np.asarray(masks("model.layers.3.mlp.gate_proj.weight", 0, shape, 0.5), np.float64)
    tolerance = 5 / np.sqrt(first.size)  # five standard errors of a correlation estimated from n pairs
    pairs = {"neighbouring entries": (first[:, :-1], first[:, 1:]), "neighbouring rows": (first[:-1], first[1:]),
             "entries 2^k apart": (first.ravel()[:-4096], first.ravel()[4096:]),
             "another input": (first, np.asarray(masks("model.layers.3.mlp.gate_proj.weight", 1, shape, 0.5))),
             "another tensor": (first, np.asarray(masks("model.layers.3.mlp.up_proj.weight", 0, shape, 0.5)))}
    for what, (a, b) in pairs.items():
        correlation = np.corrcoef(np.ravel(a), np.ravel(b).astype(np.float64))[0, 1]
        assert abs(correlation) < tolerance, (what, correlation)
    for density in (0.0, 0.01, 0.3, 0.9, 1.0):
        kept = float(jnp.mean(masks("lm_head.weight", 0, shape, density)))
        assert abs(kept - density) <= 5 * np.sqrt(density * (1 - density) / first.size), (density, kept)
    bands = np.repeat(np.linspace(0.05, 0.95, 10, dtype=np.float32), shape[0] * shape[1] // 10).reshape(shape)
    kept = np.asarray(masks("lm_head.weight", 1, shape, jnp.asarray(bands))).reshape(10, -1).mean(axis=1)
    band_size = first.size // 10
    expected = np.linspace(0.05, 0.95, 10)
    assert np.all(np.abs(kept - expected) < 5 * np.sqrt(expected * (1 - expected) / band_size)), kept


def test_a_mask_larger_than_its_counters_is_refused():
    from bmx.merge.drop_masks import MAX_MASK_ENTRIES, keyed_counter_bits

    with pytest.raises(ValueError, match="more than the 4294967296"):
        keyed_counter_bits(jax.random.key(0), (MAX_MASK_ENTRIES // 1024 + 1, 1024))


def test_masks_do_not_depend_on_tensor_order_or_device():
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(6)]
    masks = SeededDropMasks(seed=11)
    forward = {name: np.asarray(masks(name, 1, (16, 8), 0.5)) for name in names}
    with jax.default_device(jax.devices()[-1]):
        backward = {name: np.asarray(masks(name, 1, (16, 8), 0.5)) for name in reversed(names)}
    for name in names:
        np.testing.assert_array_equal(forward[name], backward[name])
    assert not np.array_equal(forward[names[0]], forward[names[1]])  # each tensor gets its own mask
    assert not np.array_equal(forward[names[0]], np.asarray(masks(names[0], 0, (16, 8), 0.5)))  # and each input


def test_masks_are_the_same_in_a_fresh_process():
    """No per-process state (Python's salted hash, a global RNG) enters the keys."""
    code = (
        "import json, numpy as np; from bmx.merge import SeededDropMasks;"
        "print(json.dumps(np.asarray(SeededDropMasks(3)('lm_head.weight', 2, (8, 8), 0.4)).tolist()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2], env={"JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": "123", "PATH": ""})
    here = np.asarray(SeededDropMasks(3)("lm_head.weight", 2, (8, 8), 0.4))
    np.testing.assert_array_equal(np.array(json.loads(result.stdout)), here)


def test_same_seed_same_merge_other_seed_other_merge(tiny_models, tmp_path):
    config = write_config(tiny_models / f"{tmp_path.name}.yaml", dare_config("dare_ties", {}))
    for run, seed in (("first", 7), ("again", 7), ("other", 8)):
        run_merge(config, tmp_path / run, seed=seed)
    first, again, other = (SafetensorsReader(tmp_path / run) for run in ("first", "again", "other"))
    name = "model.layers.2.mlp.down_proj.weight"
    for tensor in first.names():
        np.testing.assert_array_equal(first.read(tensor), again.read(tensor))
    assert not np.array_equal(first.read(name), other.read(name))


def test_a_tensor_merged_alone_equals_the_same_tensor_in_a_full_merge(tiny_models, tmp_path):
    config_file = write_config(tiny_models / f"{tmp_path.name}.yaml", dare_config("dare_linear", {}))
    run_merge(config_file, tmp_path / "full", seed=4)
    config = load_merge_config(config_file)
    models = open_models(config)
    plan = plan_merge(config, method_spec("dare_linear"), models)
    last = plan.tensors[-1]  # merged first of all here, last in the full run
    alone, _ = merge_tensor(plan.method, last, _read_inputs(last, models, jax.devices()[0]), SeededDropMasks(4))
    np.testing.assert_array_equal(np.asarray(alone), SafetensorsReader(tmp_path / "full").read(last.name))
