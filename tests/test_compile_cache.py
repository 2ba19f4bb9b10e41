"""The persistent compilation cache every command turns on: where it goes, how it is turned off, and
that a fresh process really writes compiled programs there and reads them back."""

import os
import subprocess
import sys

import pytest

from bmx.compile_cache import ENV, cache_dir, enable_compile_cache


def test_the_cache_lives_under_the_users_cache_home_unless_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bmx" / "jax"
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"  # a command's --compile-cache wins
    for off in ("off", "0", "none", ""):
        monkeypatch.setenv(ENV, off)
        assert cache_dir() is None and enable_compile_cache() is None
    assert cache_dir("off") is None


def test_the_test_suite_itself_writes_no_cache():
    assert cache_dir() is None  # tests/conftest.py turns it off, so nothing lands in ~/.cache


PROGRAM = """
import sys
from bmx.compile_cache import enable_compile_cache
enable_compile_cache()
import jax
import jax.numpy as jnp
from jax._src import monitoring
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
print(float(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).sum()), len(hits))
"""


@pytest.mark.slow  # two fresh Python processes importing jax
def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    env = {**os.environ, ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    runs = [subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    (first_value, first_hits), (second_value, second_hits) = (run.stdout.split() for run in runs)
    assert first_value == second_value and int(first_hits) == 0 and int(second_hits) >= 1
    assert any((tmp_path / "cache").iterdir())
