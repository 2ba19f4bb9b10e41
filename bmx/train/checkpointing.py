"""Training checkpoints with orbax's CheckpointManager: save every N steps, keep K, resume the latest good one.

A step directory holds `params` (the same PyTree layout as a bmx checkpoint's `params/`),
`opt_state`, `loader` (the data iterator's JSON state) and `meta` (step, the resolved run config and
the model architecture). Orbax writes under a temporary name and commits by rename, so an
interrupted save is never listed; a listed step that fails to restore is skipped with a warning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from bmx.paths import absolute

log = logging.getLogger("bmx.train")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (a checkpoint is also written at the end)
    keep: int = 3  # how many recent checkpoints to keep
    async_save: bool = True  # write in the background while training continues


def make_manager(run_dir: epath.PathLike, config: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep,
        enable_async_checkpointing=config.async_save,
        cleanup_tmp_directories=True,
    )
    directory = absolute(run_dir) / "checkpoints"  # local or gs://…
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("params", "opt_state", "loader", "meta"))


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, loader_state: dict, meta: dict,
         force: bool = False) -> bool:
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        loader=ocp.args.JsonSave(loader_state),
        meta=ocp.args.JsonSave({**meta, "step": step}),
    )
    return manager.save(step, args=args, force=force)


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Move an unreadable step aside (kept for inspection) so that step can be saved again."""
    source = epath.Path(manager.directory) / str(step)
    target = epath.Path(manager.directory).parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.exists() and jax.process_index() == 0:
        source.rename(target)
    manager.reload()
    return target


def restore_latest(manager: ocp.CheckpointManager, abstract_params, abstract_opt_state) -> tuple[int, Any, Any, dict, dict] | None:
    """(step, params, opt_state, loader_state, meta) of the newest checkpoint that restores, or None."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                loader=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ))
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped, never half-loaded
            quarantine = _quarantine(manager, step)
            log.warning("checkpoint at step %d in %s cannot be restored and is skipped (moved to %s): %s",
                        step, manager.directory, quarantine, str(error).splitlines()[0][:300])
            continue
        return step, restored.params, restored.opt_state, restored.loader, restored.meta
    return None
