"""Keep freed host memory mapped, so that each training step does not page it in afresh.

glibc's malloc hands every large block back to the kernel when it is freed (mmap/munmap), and its
per-thread arenas do the same. XLA:CPU allocates a step's activations (gigabytes at the ~125M
shape) anew each step, so every step faulted ~560k fresh pages in, zero-filled by the kernel:
about 7% of a CPU step (9.5 s → 8.8 s at `bench/train_throughput.py`'s shape). One arena, no mmap
and no trimming keep the pages of the previous step. glibc reads these settings only at start,
hence a re-exec of the same command line with `GLIBC_TUNABLES` set.

Only on CPU hosts: on a GPU or TPU host the step's activations live in device memory, so there is
nothing to gain, and a pod job should not restart itself under changed malloc settings. A host
counts as CPU-only when `JAX_PLATFORMS` names only `cpu`, or when it has no NVIDIA, TPU (`accel`)
or VFIO device files. `BMX_HOST_MALLOC=system` keeps glibc's defaults everywhere.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

RETAIN_FREED_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                       "glibc.malloc.trim_threshold=68719476736")


def _missing_tunables(environment: dict[str, str]) -> list[str]:
    present = {item.split("=")[0] for item in environment.get("GLIBC_TUNABLES", "").split(":") if item}
    return [item for item in RETAIN_FREED_MEMORY if item.split("=")[0] not in present]


ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def accelerator_host(environment: dict[str, str]) -> bool:
    platforms = {name.strip() for name in environment.get("JAX_PLATFORMS", "").split(",") if name.strip()}
    if platforms and platforms <= {"cpu"}:
        return False
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def retained_memory_environment(environment: dict[str, str]) -> dict[str, str]:
    """`environment` with the tunables added to those the user set (a user's own value wins)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or environment.get("BMX_HOST_MALLOC") == "system" \
            or accelerator_host(environment):
        return dict(environment)
    present = environment.get("GLIBC_TUNABLES", "")
    return {**environment, "GLIBC_TUNABLES": ":".join([*_missing_tunables(environment), *([present] if present else [])])}


def reexec_with_retained_memory() -> None:
    """Restart this process with the same command line and the tunables set, unless they already are
    (or do not apply). Call it first thing in a command's entry point: nothing before it survives."""
    environment = retained_memory_environment(dict(os.environ))
    if not _missing_tunables(environment) and _missing_tunables(dict(os.environ)):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environment)
