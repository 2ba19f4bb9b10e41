"""Keep freed host memory mapped, so that each training step does not page it in afresh.

glibc's malloc hands every large block back to the kernel when it is freed (mmap/munmap), and its
per-thread arenas do the same. XLA:CPU allocates a step's activations (gigabytes at the ~125M
shape) anew each step, so every step faulted ~560k fresh pages in, zero-filled by the kernel:
about 7% of a CPU step (9.5 s → 8.8 s at `bench/train_throughput.py`'s shape). One arena, no mmap
and no trimming keep the pages of the previous step. glibc reads these settings only at start,
hence a re-exec of the same command line with `GLIBC_TUNABLES` set.

`BMX_HOST_MALLOC=system` keeps glibc's defaults.
"""

from __future__ import annotations

import os
import platform
import sys

RETAIN_FREED_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                       "glibc.malloc.trim_threshold=68719476736")


def _missing_tunables(environment: dict[str, str]) -> list[str]:
    present = {item.split("=")[0] for item in environment.get("GLIBC_TUNABLES", "").split(":") if item}
    return [item for item in RETAIN_FREED_MEMORY if item.split("=")[0] not in present]


def retained_memory_environment(environment: dict[str, str]) -> dict[str, str]:
    """`environment` with the tunables added to those the user set (a user's own value wins)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or environment.get("BMX_HOST_MALLOC") == "system":
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
