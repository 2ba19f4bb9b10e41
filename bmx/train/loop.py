"""`train(config)`: build the mesh and state, resume or initialise, run the loop, checkpoint, export.

Reading order: `train` is the whole story; `bmx.train.setup.build` makes everything it compiles, and
`bmx.train.trainable` says what each task trains and holds frozen.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from bmx.config_io import ConfigError, to_dict
from bmx.data.loader import count_sequences, make_loader
from bmx.checkpoints import read_params
from bmx.model.checkpoint import write_checkpoint
from bmx.model.config import MistralConfig
from bmx.train import checkpointing
from bmx.train.config import RunConfig
from bmx.train.flops import peak_flops_per_device, training_flops_per_token
from bmx.train.metrics import MetricsWriter
from bmx.train.setup import build, compute_dtype

log = logging.getLogger("bmx.train")


def _global_batch(local_batch: dict[str, np.ndarray], sharding, global_batch_size: int) -> dict[str, jax.Array]:
    """Each process contributes its rows; the result is one global array per field."""
    return {name: jax.make_array_from_process_local_data(sharding, value, (global_batch_size, *value.shape[1:]))
            for name, value in local_batch.items()}


class _StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame):
        log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _evaluate(eval_step, params, frozen, config: RunConfig, sharding) -> dict[str, float]:
    loader = make_loader(config.data.path, split="validation", global_batch_size=config.train.global_batch_size,
                         seed=0, num_epochs=1)
    loss_total, tokens = 0.0, 0.0
    for _, local_batch in zip(range(config.train.eval_batches), loader):
        loss_sum, count = eval_step(params, _global_batch(local_batch, sharding, config.train.global_batch_size),
                                    frozen)
        loss_total, tokens = loss_total + float(loss_sum), tokens + float(count)
    mean = loss_total / max(tokens, 1.0)
    return {"eval_loss": mean, "eval_perplexity": float(np.exp(mean)), "eval_tokens": tokens}


def train(config: RunConfig, devices=None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the last logged metrics.

    `devices`: the devices of the mesh (default: all of them).
    """
    run_dir = epath.Path(config.run_dir)  # local or an object store (gs://…)
    resolved = _check_and_record(config, run_dir)
    # The loader checks its shards against the manifest: a stale shard is refused before the setup.
    loader = make_loader(config.data.path, split="train", global_batch_size=config.train.global_batch_size,
                         seed=config.data.seed, num_epochs=config.data.num_epochs)
    setup = build(config, devices)
    manager = checkpointing.make_manager(run_dir, config.checkpoint)
    meta = {"config": resolved, "model": setup.model_config.to_dict()}
    try:
        return _train_steps(config, setup, manager, loader, run_dir, meta)
    except BaseException:
        checkpointing.close_quietly(manager)  # background saves end before the process does
        raise


def _train_steps(config: RunConfig, setup, manager, loader, run_dir: epath.Path, meta: dict) -> dict[str, Any]:
    step, params, opt_state, frozen = _starting_state(config, setup, manager, loader, meta)
    if jax.process_index() == 0:
        _record_config(run_dir, meta["config"])
    _keep_superseded_metrics(run_dir, step)
    reporter = _Reporter(config, setup, run_dir, step)
    with _StopRequest() as stop:
        try:
            while step < config.train.steps:
                batch = _global_batch(next(loader), setup.data_sharding, config.train.global_batch_size)
                params, opt_state, step_metrics = setup.train_step(params, opt_state, batch, frozen)
                step += 1
                final = step == config.train.steps
                reporter.step_done(step, step_metrics, force=final or stop.requested,
                                   evaluate=functools.partial(_evaluate, setup.eval_step, params, frozen, config,
                                                              setup.data_sharding))
                if step % config.checkpoint.every == 0 or final or stop.requested:
                    checkpointing.save(manager, step, params, opt_state, loader.get_state(), meta, force=True)
                if stop.requested:
                    break
        except Exception as error:
            if jax.process_count() > 1:  # the usual cause, which the raw collective error does not name
                raise RuntimeError(f"training failed on process {jax.process_index()} after step {step}: another "
                                   "process probably died or was preempted (see its log)") from error
            raise
    reporter.close()
    checkpointing.wait_until_finished(manager)
    if not stop.requested and step >= config.train.steps:
        if config.task == "sft":
            _write_adapter(setup, config, params, frozen, run_dir / "adapter")
        params = setup.trainable.export(params, frozen, lambda: _read_base(config, setup))
        with checkpointing.naming_write_failures(run_dir / "model"):
            _write_final_model(run_dir, setup.model_config, params, config.export_hf)
    return {"step": step, **reporter.last}


def _check_and_record(config: RunConfig, run_dir: epath.Path) -> dict[str, Any]:
    """Refuse a config that cannot run, or that would change the shape of the run already in `run_dir`;
    print the resolved config and save it in the run directory."""
    if not config.data.path:
        raise ConfigError("data.path: not set; point it at a directory made by `python -m bmx.data prepare`")
    train_sequences = count_sequences(config.data.path, "train")  # the manifest's absence names its path
    if train_sequences == 0:
        raise ConfigError(f"data.path: the train split of {config.data.path} holds 0 sequences (too few tokens "
                          "for its seq_len, or every input was rejected: see its manifest.json)")
    if config.data.num_epochs is not None:
        batches = train_sequences * config.data.num_epochs // config.train.global_batch_size
        if batches < config.train.steps:
            raise ConfigError(f"train.steps: {config.train.steps} steps need more global batches than "
                              f"data.num_epochs={config.data.num_epochs} of {train_sequences} sequences give "
                              f"({batches} of {config.train.global_batch_size})")
    if config.train.eval_every and count_sequences(config.data.path, "validation") < config.train.global_batch_size:
        raise ConfigError(f"train.eval_every: set, but the validation split of {config.data.path} has fewer than "
                          f"train.global_batch_size={config.train.global_batch_size} sequences; prepare the data "
                          "with a larger --val-fraction or set train.eval_every=0")
    resolved = to_dict(config)
    saved = run_dir / "config.yaml"
    if saved.exists() and _has_history(run_dir):
        changes = checkpointing.structure_changes(yaml.safe_load(saved.read_text()) or {}, resolved)
        if changes:
            raise ConfigError(f"run_dir: {run_dir} holds a run of another shape ({'; '.join(changes)}); re-run it "
                              "with the config it was started with, or set a new run_dir")
    if jax.process_index() == 0:
        print("resolved config:\n" + yaml.safe_dump(resolved, sort_keys=False), flush=True)
        if not saved.exists():  # else rewritten once the checkpoints are known to be of this shape
            _record_config(run_dir, resolved)
    return resolved


def _record_config(run_dir: epath.Path, resolved: dict[str, Any]) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    except OSError as error:
        raise OSError(error.errno, f"run_dir {run_dir} is not writable ({error.strerror or error})") from None


def _has_history(run_dir: epath.Path) -> bool:
    """Whether a run already got somewhere here: logged steps or checkpoints."""
    checkpoints = run_dir / "checkpoints"
    return (run_dir / "metrics.jsonl").exists() or (checkpoints.exists() and any(checkpoints.iterdir()))


def _keep_superseded_metrics(run_dir: epath.Path, step: int) -> None:
    """Before the metrics writer drops lines past the step training restarts from, keep the whole file
    aside: history is never lost, even when no checkpoint could be restored."""
    metrics = run_dir / "metrics.jsonl"
    if jax.process_index() != 0 or not metrics.exists():
        return
    text = metrics.read_text()
    steps = [json.loads(line).get("step", 0) for line in text.splitlines() if line.strip()]
    if any(logged > step for logged in steps):
        kept = run_dir / f"metrics.until-step-{max(steps)}.{int(time.time())}.jsonl"
        kept.write_text(text)
        log.warning("restarting at step %d: the metrics logged past it are kept in %s", step, kept)


def _starting_state(config: RunConfig, setup, manager, loader, meta: dict) -> tuple[int, Any, Any, Any]:
    """(step, params, opt_state, frozen): resumed from the newest good checkpoint, else started from
    `init.from` or from scratch. Checkpoints hold only what trains: the frozen part (sft's base) is
    rebuilt from `init.from` on every (re)start."""
    trainable = setup.trainable
    restored = checkpointing.restore_latest(manager, trainable.abstract_params, setup.abstract_opt_state, meta)
    if restored is None:
        params, frozen = trainable.start(_read_base(config, setup))
        return 0, params, jax.jit(setup.optimizer.init, out_shardings=setup.opt_sharding)(params), frozen
    step, params, opt_state, loader_state, _ = restored
    loader.set_state(loader_state)
    log.warning("resumed from step %d of %s", step, manager.directory)
    # Only a frozen part needs `init.from` again: pretraining's checkpoint holds every parameter.
    _, frozen = trainable.start(_read_base(config, setup)) if trainable.abstract_frozen else (None, {})
    return step, params, opt_state, frozen


def _read_base(config: RunConfig, setup):
    """The parameters stored in `init.from`, as the task reads them (None without `init.from`)."""
    if config.init.from_ is None:
        return None
    return read_params(config.init.from_, setup.trainable.abstract_base, dtype=jnp.dtype(config.model.param_dtype))


class _Reporter:
    """Progress bar, and every `logging.every` steps: loss, throughput, MFU (and held-out loss when due)
    to metrics.jsonl, TensorBoard, W&B and the bar. Reading the metrics is the loop's only host sync."""

    def __init__(self, config: RunConfig, setup, run_dir: epath.Path, step: int):
        self.config, self.setup = config, setup
        is_main = jax.process_index() == 0
        self.flops_per_token = training_flops_per_token(setup.model_config, setup.seq_len)
        self.peak_flops, peak_source = peak_flops_per_device(config.logging.peak_flops)
        if is_main:
            print(f"model: {setup.model_config.num_parameters() / 1e6:.1f}M parameters, mesh {dict(setup.mesh.shape)}"
                  f", compute {compute_dtype(config).name}, peak {self.peak_flops / 1e12:.2f} TFLOP/s per device "
                  f"({peak_source})", flush=True)
        self.writer = MetricsWriter(run_dir, step, config.logging.tensorboard, enabled=is_main,
                                    wandb=config.logging.wandb, run_config=to_dict(config))
        self.progress = tqdm(total=config.train.steps, initial=step, desc="train", unit="step",
                             disable=not (is_main and config.logging.progress))
        self.last: dict[str, Any] = {}
        self.window_start, self.window_steps = time.perf_counter(), 0

    def step_done(self, step: int, step_metrics, force: bool, evaluate: Callable[[], dict[str, float]]) -> None:
        self.window_steps += 1
        self.progress.update()
        config, final = self.config, step == self.config.train.steps
        if not (step % config.logging.every == 0 or force):
            return
        step_metrics = jax.device_get(step_metrics)  # waits for the step
        elapsed = time.perf_counter() - self.window_start
        tokens_per_second = self.window_steps * config.train.global_batch_size * self.setup.seq_len / elapsed
        self.last = {"loss": float(step_metrics["loss"]), "grad_norm": float(step_metrics["grad_norm"]),
                     "lr": float(self.setup.schedule(step - 1)), "tokens_per_second": tokens_per_second,
                     "step_time": elapsed / self.window_steps,
                     "mfu": tokens_per_second * self.flops_per_token / (self.peak_flops * self.setup.mesh.size)}
        if config.train.eval_every and (step % config.train.eval_every == 0 or final):
            self.last.update(evaluate())
        self.writer.write(step, self.last)
        self.progress.set_postfix(loss=f"{self.last['loss']:.4f}", mfu=f"{self.last['mfu']:.1%}")
        self.window_start, self.window_steps = time.perf_counter(), 0

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def _write_adapter(setup, config: RunConfig, adapters, frozen, adapter_dir: epath.Path) -> None:
    """sft: the trained adapters in PEFT's layout, in `adapter_dir`."""
    from jax.experimental import multihost_utils

    from bmx.lora import save_peft_adapter

    host_adapters = multihost_utils.process_allgather(adapters, tiled=True)  # small: rank-r matrices
    if jax.process_index() == 0:
        save_peft_adapter(nnx.merge(setup.trainable.graphdef, host_adapters, frozen), config.lora, adapter_dir,
                          base_model_name_or_path=config.init.from_)


def _write_final_model(run_dir: epath.Path, model_config: MistralConfig, params, export_hf: str | None) -> None:
    """`RUN_DIR/model`: a bmx checkpoint of the final parameters; optionally exported to HF too.

    Every process writes its shards into one staging directory that process 0 publishes by rename.
    """
    from jax.experimental import multihost_utils

    final_dir = run_dir / "model"
    staging = run_dir / ".model.partial"
    is_main = jax.process_index() == 0
    if not final_dir.exists():
        if is_main and staging.exists():
            staging.rmtree()
        multihost_utils.sync_global_devices("bmx: final model staging ready")
        write_checkpoint(staging, model_config, params, write_metadata=is_main)
        multihost_utils.sync_global_devices("bmx: final model written")
        if is_main:
            staging.rename(final_dir)
    if export_hf and is_main:
        from bmx.convert import bmx_to_hf

        bmx_to_hf(final_dir, export_hf)
