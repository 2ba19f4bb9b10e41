"""JAX's persistent compilation cache, on for every bmx command.

A user runs `python -m bmx.eval` (or generate, quant, ...) once per model, so XLA compilation is a
large part of what they wait for. With the cache, the second run of the same command on the same
shapes loads the compiled programs from disk instead of compiling them again.

Where: `--compile-cache DIR` where a command has the flag, else `$BMX_COMPILE_CACHE`, else JAX's own
`$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/bmx/jax` (`~/.cache/bmx/jax`). `off` (or `0`,
`none`, empty) turns it off. The settings also go into the environment, so they hold for a jax
imported later and for the command's subprocesses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "BMX_COMPILE_CACHE"
_OFF = ("off", "0", "none", "false", "")


def cache_dir(setting: str | None = None) -> Path | None:
    """The cache directory `setting` (or the environment) asks for; None when turned off."""
    value = setting if setting is not None else os.environ.get(ENV, os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    if value is None:
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(cache_home) / "bmx" / "jax"
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable_compile_cache(setting: str | None = None) -> Path | None:
    """Point JAX's persistent cache at `cache_dir(setting)`; returns the directory, or None when off.

    Call before the first compilation. Every program is cached, however fast it compiled (JAX's
    default skips those under a second, which is most of a small model's, yet together they are
    the cold start).
    """
    directory = cache_dir(setting)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only home must not stop the command: it only runs colder
        print(f"bmx: compilation cache off: cannot create {directory} ({error.strerror})", file=sys.stderr)
        return None
    settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)  # read when jax is imported (here, or in a subprocess)
    if "jax" in sys.modules:  # already imported: the environment is read, so set its config too
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    return directory
