"""Test-wide setup: 8 simulated CPU devices for sharding tests, and paths to the shared real data."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: multi-device code is tested on 8 simulated CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch's own thread pool fights XLA's for the 2 cores and stalls the reference computations.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Commands turn on JAX's persistent compilation cache in ~/.cache; tests must not write there.
os.environ.setdefault("BMX_COMPILE_CACHE", "off")

import pytest  # noqa: E402

pytest_plugins = ["object_store"]  # the fake_gcs fixture (tests/object_store.py)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Heavy checks run in a reduced size by default (CI); BMX_FULL_TESTS=1 runs them at full size.
FULL_TESTS = os.environ.get("BMX_FULL_TESTS") == "1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (it lives beside the checkout in ../shared/data)")
    return SHARED_DATA
