"""Weights & Biases as one more place training metrics go (`logging.wandb`), next to metrics.jsonl and TensorBoard.

wandb is an optional extra (`pip install 'bmx[wandb]'`): nothing here imports it unless a run asks for it.
The run id is kept in `RUN_DIR/wandb_run_id`, so a run restarted after preemption continues the same W&B
run. Steps trained again after a restore are the ones already logged (resume is exact), and W&B ignores
a step lower than the last one it holds.
"""

from __future__ import annotations

import importlib.util
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from etils import epath

from bmx.config_io import ConfigError
from bmx.paths import is_local

RUN_ID_FILE = "wandb_run_id"


@dataclass
class WandbConfig:
    project: str
    entity: str | None = None  # a W&B team or user; None: the logged-in user's default entity
    name: str | None = None  # the run's display name; None: the run directory's name
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: written under RUN_DIR/wandb for `wandb sync`

    def __post_init__(self) -> None:  # at config load, before any work: the CLI reports it in one line
        require_wandb(self)


def require_wandb(config: WandbConfig) -> None:
    """Refuse a config that logs to W&B where wandb is not installed."""
    if config.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb is set but wandb is not installed: pip install 'bmx[wandb]' "
                          "(or remove logging.wandb, or set logging.wandb.mode=disabled)")


def start_run(config: WandbConfig, run_dir: epath.PathLike, run_config: dict[str, Any]):
    """A W&B run holding the resolved config, continuing this run directory's earlier W&B run if any;
    None when `mode` is disabled. Call it on process 0 only."""
    if config.mode == "disabled":
        return None
    import wandb

    run_dir = epath.Path(run_dir)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    # wandb writes its local files through the OS; on an object store they go to its default (./wandb).
    local_dir = str(run_dir) if is_local(run_dir) else None
    run = wandb.init(project=config.project, entity=config.entity, name=config.name or run_dir.name,
                     mode=config.mode, dir=local_dir, config=run_config, id=run_id, resume="allow")
    id_file.write_text(run_id + "\n")
    return run
