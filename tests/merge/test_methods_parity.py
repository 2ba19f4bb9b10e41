"""The rest of mergekit 0.1.5's registry: bmx.merge equals mergekit on every tensor (float32, within 1e-6;
passthrough bit for bit), each method with per-layer gradients or filters on the parameters it takes.

Models are the two-layer, all-64x64 `square_models` so that each method's kernels compile for two
shapes only; DELLA's random drops are injected into both sides (`InjectedMasks`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bmx.convert.safetensors_io import SafetensorsReader
from bmx.merge import run_merge
from bmx.merge.method_specs import METHODS
from merge.merge_testing import InjectedMasks, assert_same_tensors, inject_into_mergekit, run_mergekit, write_config


def _models(base: str | None, *entries, **shared) -> dict:
    config = {"models": [{"model": model, **({"parameters": p} if p else {})} for model, p in entries], "dtype": "float32"}
    if base:
        config["base_model"] = base
    if shared:
        config["parameters"] = shared
    return config


FINE_TUNES = ("tuned_a", "tuned_b", "tuned_c")
CASES = {
    "model_stock": _models("base", ("base", None), *((m, None) for m in FINE_TUNES)),
    "model_stock-filter_wise": _models("base", *((m, None) for m in FINE_TUNES),
                                       filter_wise=[{"filter": "mlp", "value": True}, {"value": False}]),
    "sce": _models("base", ("tuned_a", None), ("sparse_a", None), ("tuned_b", None),
                   select_topk=[{"filter": "self_attn", "value": [0.3, 0.8]}, {"value": 0.5}]),
    "sce-int8": _models("base", ("tuned_a", None), ("sparse_b", None), int8_mask=True),
    "nuslerp-base": _models("base", ("tuned_a", {"weight": [0.3, 0.9]}), ("tuned_b", {"weight": 0.5})),
    "nuslerp-rows": _models(None, ("base", {"weight": 0.4}), ("other", {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]}),
                            nuslerp_flatten=False, nuslerp_row_wise=[{"filter": "o_proj", "value": True}, {"value": False}]),
    "multislerp-base": _models("base", ("tuned_a", {"weight": 0.5}), ("tuned_b", {"weight": [0.2, 0.6]}), ("tuned_c", {"weight": 0.3})),
    "multislerp": _models(None, ("base", {"weight": 0.7}), ("other", {"weight": 0.6}), normalize_weights=False),
    "karcher": _models(None, ("base", None), ("tuned_b", None), ("other", None), max_iter=[{"filter": "mlp", "value": 3}, {"value": 10}]),
    "nearswap": _models("base", ("base", None), ("tuned_b", None), t=[0.005, 0.02]),
    "ram": _models("base", ("sparse_a", None), ("sparse_b", None), ("tuned_a", None), epsilon=[{"filter": "norm", "value": 1e-3}, {"value": 1e-5}]),
    "ramplus_tl": _models("base", ("sparse_a", None), ("sparse_b", None), r=[0.2, 0.5], alpha=0.3),
    "breadcrumbs": _models("base", ("tuned_a", {"weight": 0.6, "density": 0.8, "gamma": [0.02, 0.1]}),
                           ("tuned_b", {"weight": 0.4, "density": [0.5, 0.9]})),
    "breadcrumbs_ties": _models("base", ("tuned_a", {"weight": 0.6, "density": 0.7}), ("tuned_b", {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
                                ("other", {"weight": 0.2, "density": 0.9}), normalize=True),
}
RANDOM_CASES = {
    "della": _models("base", ("tuned_a", {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
                     ("tuned_b", {"weight": 0.3, "density": [0.3, 0.7], "epsilon": 0.2}), ("tuned_c", {"weight": [0.2, 0.6], "density": 0.6})),
    "della_linear": _models("base", ("tuned_a", {"weight": 0.5, "density": 0.4}), ("tuned_b", {"weight": 0.7, "density": 0.7, "epsilon": 0.05}),
                            **{"lambda": 1.2, "rescale": [{"filter": "norm", "value": False}, {"value": True}]}),
}


def _config(case: str, table: dict) -> dict:
    return {**table[case], "merge_method": case.split("-")[0]}


def merge_both(models, tmp_path, config: dict, **options):
    run_merge(write_config(models / f"{tmp_path.name}.yaml", config), tmp_path / "bmx", **options)
    run_mergekit(config, models, tmp_path / "mergekit")
    return tmp_path / "bmx", tmp_path / "mergekit"


@pytest.mark.parametrize("case", CASES)
def test_method_matches_mergekit(square_models, tmp_path, case):
    ours, reference = merge_both(square_models, tmp_path, _config(case, CASES))
    assert_same_tensors(ours, reference)


def test_arcee_fusion_matches_mergekit_except_at_threshold_ties(square_models, tmp_path):
    """Equal to mergekit except where an entry's importance is within rounding of the threshold. The row KL
    divergence of two near-equal softmaxes is a sum of cancelling terms, so torch's and XLA's exp/log kernels
    (which differ by CPU: AVX2, AVX-512) give importances ~0.1 % apart; an entry that close to the threshold
    may flip its keep decision. Each differing entry must lie within twice the measured importance gap."""
    import torch
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    from bmx.merge.entrywise import arcee_importance

    config = {**_models("base", ("base", None), ("tuned_b", None)), "merge_method": "arcee_fusion"}
    ours, reference = merge_both(square_models, tmp_path, config)
    a, b = SafetensorsReader(ours), SafetensorsReader(reference)
    base, other = SafetensorsReader(square_models / "base"), SafetensorsReader(square_models / "tuned_b")
    assert sorted(a.names()) == sorted(b.names())
    ties = 0
    for name in b.names():
        x, y = np.asarray(a.read(name)), np.asarray(b.read(name))
        assert x.dtype == y.dtype and x.shape == y.shape, name
        differ = np.abs(x.astype(np.float64) - y.astype(np.float64)) > 1e-6
        if not differ.any():
            continue
        w0, w1 = (torch.from_numpy(np.asarray(r.read(name), np.float32).copy()) for r in (base, other))
        importance = _compute_importance(w1, w0).numpy()
        threshold = float(DynamicThresholdFusion().compute_fusion_mask(torch.from_numpy(importance))[1])
        gap = float(np.abs(np.asarray(arcee_importance(w0.numpy(), w1.numpy())) - importance).max())
        assert gap <= 1e-2 * threshold, f"{name}: importances {gap:.3g} apart, threshold {threshold:.3g}"
        near = np.abs(importance - threshold) <= 2 * gap
        assert near[differ].all(), f"{name}: {int((differ & ~near).sum())} entries differ away from the threshold"
        assert np.isin(x[differ], np.stack([w0.numpy()[differ], w1.numpy()[differ]])).all(), name
        ties += int(differ.sum())
    assert ties <= 4  # a tie is rare: a handful of the ~40k entries at most


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_method_matches_mergekit_with_the_same_draws(square_models, tmp_path, monkeypatch, case):
    base = SafetensorsReader(square_models / "base")
    masks = InjectedMasks([(n, base.spec(n).shape) for n in base.names()], inputs=3)
    config = _config(case, RANDOM_CASES)
    run_merge(write_config(square_models / f"{tmp_path.name}.yaml", config), tmp_path / "bmx", drop_masks=masks)
    inject_into_mergekit(monkeypatch, masks)
    run_mergekit(config, square_models, tmp_path / "mergekit")
    assert masks.used  # the masks really were drawn
    assert_same_tensors(tmp_path / "bmx", tmp_path / "mergekit")


def test_passthrough_frankenmerge_stacks_layer_ranges_bit_for_bit(square_models, tmp_path):
    config = {
        "slices": [
            {"sources": [{"model": "base", "layer_range": [0, 2]}]},
            {"sources": [{"model": "other", "layer_range": [1, 2]}]},
            {"sources": [{"model": "tuned_a", "layer_range": [0, 2],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.3}, {"filter": "down_proj", "value": [0.5, 2.0]}]}}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    ours, reference = merge_both(square_models, tmp_path, config)
    assert_same_tensors(ours, reference, atol=0.0)
    for directory in (ours, reference):
        assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 5
    merged, other = SafetensorsReader(ours), SafetensorsReader(square_models / "other")
    assert (merged.read("model.layers.2.mlp.up_proj.weight") == other.read("model.layers.1.mlp.up_proj.weight")).all()


def test_every_mergekit_method_is_implemented():
    from mergekit.merge_methods import registered_methods

    assert sorted(METHODS) == sorted(m.spec.name for m in registered_methods())
    tested = {case.split("-")[0] for case in (*CASES, *RANDOM_CASES)} | {"passthrough", "arcee_fusion"}
    assert tested | {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"} == set(METHODS)


def test_parameters_defaults_and_input_contracts_are_mergekit_s():
    from mergekit.merge_methods import registered_methods

    for method in registered_methods():
        ours, theirs = METHODS[method.spec.name], method.spec
        assert {p.name: (p.scope.value, None if p.required else p.default) for p in ours.parameters} == {
            p.name: (p.scope.value, None if p.required else p.default) for p in theirs.parameters}, ours.name
        contract = theirs.contract
        assert (ours.base.value, ours.min_inputs, ours.max_inputs, ours.min_non_base, ours.max_non_base) == (
            contract.base.value, contract.min_inputs, contract.max_inputs, contract.min_non_base, contract.max_non_base), ours.name
