"""Where training metrics go: `RUN_DIR/metrics.jsonl`, TensorBoard event files, Weights & Biases (when
`logging.wandb` is set) and the console.

`RUN_DIR` may be local or an object store (`gs://…`); object stores cannot append, so there the
whole file is rewritten at each logged step (small: one line per logged step).
"""

from __future__ import annotations

import json
import logging

from etils import epath

from bmx.paths import is_local
from bmx.train.wandb_logging import WandbConfig, start_run

log = logging.getLogger("bmx.train")


class MetricsWriter:
    """Writes one JSON object per logged step; on resume, drops lines past the restored step."""

    def __init__(self, run_dir: epath.PathLike, resume_step: int, tensorboard: bool, enabled: bool = True,
                 wandb: WandbConfig | None = None, run_config: dict | None = None):
        """`run_config`: the resolved config, recorded in the W&B run."""
        self.enabled = enabled
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self.tensorboard = self.wandb_run = None
        if not enabled:
            return
        self.lines: list[str] = []
        if self.path.exists():  # a killed run may have logged steps that will now be trained again
            self.lines = [line for line in self.path.read_text().splitlines()
                          if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in self.lines))
        self.file = self.path.open("a") if is_local(self.path) else None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tensorboard = SummaryWriter(str(epath.Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX is not installed; TensorBoard event files are not written")
        if wandb is not None:
            self.wandb_run = start_run(wandb, run_dir, run_config or {})

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics})
        self.lines.append(line)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.path.write_text("".join(kept + "\n" for kept in self.lines))
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
