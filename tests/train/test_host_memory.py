"""`python -m bmx.train` restarts itself once with glibc told to keep freed memory mapped."""

import os
import subprocess
import sys

import pytest

from bmx.train.host_memory import RETAIN_FREED_MEMORY, retained_memory_environment

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables")

PROBE = """
import os, sys
from bmx.train.host_memory import reexec_with_retained_memory
print("start", os.getpid(), flush=True)
reexec_with_retained_memory()
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "argv", sys.argv[1:])
"""


def run_probe(**environment):
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "BMX_HOST_MALLOC")}
    result = subprocess.run([sys.executable, "-c", PROBE, "--flag", "x=1"], env={**env, **environment},
                            capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_restarts_once_with_the_tunables_and_the_same_arguments():
    lines = run_probe()
    starts = [line for line in lines if line.startswith("start")]
    assert len(starts) == 2 and starts[0] == starts[1]  # execve: the same process, restarted once
    assert lines[-1] == f"tunables {':'.join(RETAIN_FREED_MEMORY)} argv ['--flag', 'x=1']"


def test_a_users_own_tunables_are_kept_and_system_opts_out():
    lines = run_probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0")
    assert lines[-1].startswith("tunables glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=")
    assert lines[-1].split()[1].endswith(":glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0")
    assert len(run_probe(BMX_HOST_MALLOC="system")) == 2  # no restart
    assert retained_memory_environment({"BMX_HOST_MALLOC": "system"}) == {"BMX_HOST_MALLOC": "system"}


def test_accelerator_hosts_keep_glibcs_defaults(monkeypatch):
    import bmx.train.host_memory as host_memory

    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert host_memory.accelerator_host({})
    assert "GLIBC_TUNABLES" not in retained_memory_environment({})
    assert not host_memory.accelerator_host({"JAX_PLATFORMS": "cpu"})  # told to run on the CPU: it is a CPU run
    assert "GLIBC_TUNABLES" in retained_memory_environment({"JAX_PLATFORMS": "cpu"})
