"""Training checkpoints with orbax's CheckpointManager: save every N steps, keep K, resume the latest good one.

A step directory holds `params` (the same PyTree layout as a bmx checkpoint's `params/`),
`opt_state`, `loader` (the data iterator's JSON state) and `meta` (step, the resolved run config and
the model architecture). Orbax writes under a temporary name and commits by rename, so an
interrupted save is never listed; a listed step that fails to restore is skipped with a warning.
"""

from __future__ import annotations

import errno
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
    with naming_write_failures(manager.directory):
        return manager.save(step, args=args, force=force)


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    with naming_write_failures(manager.directory):
        manager.wait_until_finished()


class naming_write_failures:
    """A failed (possibly earlier, asynchronous) save surfaces as one OSError naming the directory.

    Orbax reports a full disk as a ValueError from tensorstore deep in a background thread; the last
    complete checkpoint is untouched (saves commit by rename), so the run can be resumed.
    """

    def __init__(self, directory):
        self.directory = directory

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None or not issubclass(exc_type, Exception) or isinstance(exc, OSError):
            return
        text = str(exc)
        full = "No space left on device" in text or "os_error_code='28'" in text
        reason = "no space left on device" if full else text.splitlines()[0][:300]
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      f"writing a checkpoint to {self.directory} failed ({reason}); the newest complete "
                      "checkpoint is kept: free space and re-run the same command to resume from it") from exc


def close_quietly(manager: ocp.CheckpointManager) -> None:
    """After a failure: let background saves finish or fail, so that exiting does not abort mid-write."""
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - the failure being handled is the one to report
        pass


# What decides the shapes of a run's checkpoints and data stream: a resumed run must keep them.
STRUCTURE_KEYS = ("task", "model.preset", "model.overrides", "model.param_dtype", "init.from",
                  "train.global_batch_size", "train.seq_len", "lora.rank", "lora.targets", "lora.base_quantization")


def run_structure(config: dict) -> dict[str, Any]:
    """The values of `STRUCTURE_KEYS` in a resolved config dict, plus whether the optimizer clips
    (clipping adds a state to the optimizer chain)."""
    structure = {}
    for key in STRUCTURE_KEYS:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        structure[key] = list(node) if isinstance(node, tuple) else node
    clip = (config.get("optimizer") or {}).get("clip_norm")
    structure["optimizer.clip_norm > 0"] = clip is not None and clip > 0
    if structure["task"] != "sft":  # adapters exist only in fine-tuning runs
        for key in ("lora.rank", "lora.targets", "lora.base_quantization"):
            structure.pop(key)
    return structure


def structure_changes(saved: dict, current: dict) -> list[str]:
    """`key: old → new` for each structural difference between two resolved configs."""
    old, new = run_structure(saved), run_structure(current)
    return [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


class RunMismatch(ValueError):
    """The run directory holds a run whose model, data or optimizer shape differs from the config's."""


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Move an unreadable step aside (kept for inspection) so that step can be saved again."""
    source = epath.Path(manager.directory) / str(step)
    target = epath.Path(manager.directory).parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.exists() and jax.process_index() == 0:
        source.rename(target)
    manager.reload()
    return target


def _check_meta(manager: ocp.CheckpointManager, step: int, expected_meta: dict) -> None:
    """Refuse a readable checkpoint of another architecture or run shape: it is not corrupt, the
    config changed, and quarantining it would throw the run away."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception:  # noqa: BLE001 - unreadable: the full restore below fails and quarantines it
        return
    changes = [f"model.{key}: {value!r} → {expected_meta['model'].get(key)!r}"
               for key, value in sorted((meta.get("model") or {}).items()) if expected_meta["model"].get(key) != value]
    changes += structure_changes(meta.get("config") or {}, expected_meta["config"])
    if changes:
        raise RunMismatch(f"the checkpoint at step {step} in {manager.directory} is of another run shape "
                          f"({'; '.join(changes)}); resume with the config it was made with, or set a new run_dir")


def restore_latest(manager: ocp.CheckpointManager, abstract_params, abstract_opt_state,
                   expected_meta: dict | None = None) -> tuple[int, Any, Any, dict, dict] | None:
    """(step, params, opt_state, loader_state, meta) of the newest checkpoint that restores, or None.

    With `expected_meta` ({"config", "model"}), a readable checkpoint of another shape is a
    `RunMismatch`; only checkpoints that cannot be read are skipped and quarantined.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        if expected_meta is not None:
            _check_meta(manager, step, expected_meta)
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
