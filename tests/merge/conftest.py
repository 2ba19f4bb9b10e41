"""Fixtures for the merge tests: tiny random Mistral models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from merge.merge_testing import SQUARE, build_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """`base` (random), `tuned_a` and `tuned_b` (base + noise, like fine-tunes), `other` (independent)."""
    root = tmp_path_factory.mktemp("tiny_models")
    build_model(root / "base", seed=0)
    build_model(root / "tuned_a", seed=1, like=root / "base", noise=0.01, norm_noise=1e-4)
    build_model(root / "tuned_b", seed=2, like=root / "base", noise=0.01, norm_noise=0.05)
    build_model(root / "other", seed=3, norm_noise=0.1)
    return root


@pytest.fixture(scope="session")
def square_models(tmp_path_factory) -> Path:
    """Two-layer models whose matrices are all 64 x 64: `base`, fine-tunes `tuned_a`/`tuned_b`/`tuned_c`,
    sparse fine-tunes `sparse_a`/`sparse_b` (30% and 50% of entries changed), and an unrelated `other`."""
    root = tmp_path_factory.mktemp("square_models")
    build_model(root / "base", seed=10, **SQUARE)
    build_model(root / "tuned_a", seed=11, like=root / "base", noise=0.01, norm_noise=1e-3, **SQUARE)
    build_model(root / "tuned_b", seed=12, like=root / "base", noise=0.02, norm_noise=0.05, **SQUARE)
    build_model(root / "tuned_c", seed=13, like=root / "base", noise=0.01, norm_noise=0.02, **SQUARE)
    build_model(root / "sparse_a", seed=14, like=root / "base", noise=0.01, norm_noise=0.01, changed_fraction=0.3, **SQUARE)
    build_model(root / "sparse_b", seed=15, like=root / "base", noise=0.01, norm_noise=0.01, changed_fraction=0.5, **SQUARE)
    build_model(root / "other", seed=16, norm_noise=0.1, **SQUARE)
    return root
