"""Run a merge end to end: plan, then read, merge and write one tensor at a time.

Host memory holds a few tensors at once whatever the model size: each input tensor is read
from its memory-mapped file, merged on the chosen JAX device and appended to the output shard;
reading the next tensor, merging this one and writing the previous one overlap (three threads). The output directory is built under a temporary name and renamed
when complete, so a failed merge leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bmx.convert import hf_to_bmx
from bmx.convert.hf import HF_SIDECAR_DIR
from bmx.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, atomic_output_dir, parse_size
from bmx.merge.config import MergeConfig, load_merge_config
from bmx.merge.drop_masks import DropMasks, SeededDropMasks
from bmx.merge.method_specs import method_spec
from bmx.merge.models import InputModel, check_compatible, open_model
from bmx.merge.plan import MergePlan, TensorPlan, plan_merge
from bmx.merge.tensor_merge import SlerpRecord, merge_tensor
from bmx.merge.vocabulary import OutputVocabulary, build_output_vocabulary

LOG = logging.getLogger("bmx.merge")

# What mergekit copies as "the tokenizer" from the donor model.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
)
JAX_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}


@dataclass
class MergeReport:
    out_dir: Path
    method: str
    seed: int
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    slerp: list[SlerpRecord] = field(default_factory=list)


def merge_device(name: str) -> jax.Device:
    try:
        return jax.devices(JAX_PLATFORMS[name])[0]
    except KeyError:
        raise ValueError(f"device {name!r}: expected one of {sorted(JAX_PLATFORMS)}") from None
    except RuntimeError:
        raise ValueError(f"device {name!r}: JAX has no such backend here (available: {sorted({d.platform for d in jax.devices()})})") from None


def _uses_tokenizer_handling(config: MergeConfig) -> bool:
    return config.tokenizer_source is not None or config.tokenizer is not None


def open_models(config: MergeConfig) -> dict[str, InputModel]:
    """Every model the config names (sources, base), opened and checked against each other."""
    references = [s.model for s in config.models] if config.models is not None else [s.model for sl in config.slices for s in sl.sources]
    references += [sl.base_model for sl in config.slices or () if sl.base_model]
    if config.base_model:
        references.append(config.base_model)
    models = {reference: open_model(reference, config.config_dir) for reference in dict.fromkeys(references)}
    check_compatible(models.values(), same_vocabulary=not _uses_tokenizer_handling(config))
    return models


def donor_model(config: MergeConfig, models: dict[str, InputModel]) -> InputModel:
    """Whose config.json the output takes: the base, else the first model named (mergekit's rule)."""
    return models[config.base_model] if config.base_model else next(iter(models.values()))


def tokenizer_source_model(config: MergeConfig, models: dict[str, InputModel]) -> InputModel | None:
    """The model named by `tokenizer_source` / `tokenizer.source`, opened if it is not an input (None for base/union)."""
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    if source is None or source in ("base", "union"):
        return None
    if source not in models:
        donor = open_model(source, config.config_dir)
        check_compatible([*models.values(), donor], same_vocabulary=False)
        return donor
    return models[source]


def _output_config(donor: InputModel, plan: MergePlan, vocabulary: OutputVocabulary | None) -> dict:
    """The donor's config.json with the merged model's layer count, vocabulary size and dtype."""
    hf_config = dict(donor.hf_config)
    hf_config[donor.architecture.layer_count_key] = plan.num_layers
    if vocabulary is not None:
        hf_config["vocab_size"] = vocabulary.rows
    largest = max(plan.tensors, key=lambda t: int(np.prod(t.shape)))
    hf_config["dtype"] = largest.out_dtype.name
    if "torch_dtype" in hf_config:  # written by transformers < 5
        hf_config["torch_dtype"] = largest.out_dtype.name
    return hf_config


def _read_inputs(plan: TensorPlan, models: dict[str, InputModel], device: jax.Device, vocabulary: OutputVocabulary | None = None) -> list[jax.Array]:
    if plan.vocabulary:  # re-index token rows on the host, then merge as usual
        host = {source.model: np.asarray(models[source.model].weights.read(source.name)).astype(plan.work_dtype) for source in plan.inputs}
        aligned = vocabulary.align(host)
        del host
        return [jax.device_put(aligned[source.model], device) for source in plan.inputs]
    arrays = []
    for source in plan.inputs:
        host = models[source.model].weights.read(source.name)
        arrays.append(jax.device_put(np.asarray(host), device).astype(plan.work_dtype))
        del host  # drop the memory map so its pages leave the resident set
    return arrays


def _write_tensors(plan: MergePlan, models, staging: Path, device, max_shard_bytes: int, drop_masks: DropMasks, report: MergeReport,
                   vocabulary: OutputVocabulary | None) -> None:
    specs = [TensorSpec(t.name, t.shape, t.out_dtype) for t in plan.tensors]
    writer = ShardedSafetensorsWriter(staging, specs, max_shard_bytes, metadata={"merged_by": "bmx.merge", "merge_method": plan.method.name})
    total = sum(spec.nbytes for spec in specs)
    # The next tensor's inputs are read (page faults, host -> device copies) on a thread while this one
    # merges; the writer's own thread writes the previous one: at most three tensors in flight.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader")
    read = lambda index: reader.submit(_read_inputs, plan.tensors[index], models, device, vocabulary)  # noqa: E731
    pending = read(0) if plan.tensors else None
    with reader, tqdm(total=total, unit="B", unit_scale=True, desc=f"merge ({plan.method.name})") as progress:
        for index, (tensor_plan, spec) in enumerate(zip(plan.tensors, specs)):
            inputs = pending.result()
            pending = read(index + 1) if index + 1 < len(plan.tensors) else None
            merged, slerp_record = merge_tensor(plan.method, tensor_plan, inputs, drop_masks)
            writer.write(tensor_plan.name, np.asarray(merged.astype(tensor_plan.out_dtype)))
            del inputs, merged
            if slerp_record is not None:
                report.slerp.append(slerp_record)
                LOG.info("slerp %s: t=%.4f cos=%+.6f %s", slerp_record.name, slerp_record.t, slerp_record.cosine,
                         "linear fallback" if slerp_record.linear_fallback else "spherical")
            report.tensors += 1
            report.bytes_written += spec.nbytes
            progress.update(spec.nbytes)
    writer.finish()


def _copy_tokenizer(donor: InputModel, staging: Path) -> None:
    # A bmx checkpoint keeps its tokenizer and its original HF sidecar files in subdirectories.
    folders = dict.fromkeys((donor.tokenizer_dir, donor.path, donor.path / HF_SIDECAR_DIR))
    copied = []
    for name in TOKENIZER_FILES:
        source = next((folder / name for folder in folders if (folder / name).is_file()), None)
        if source is not None:
            shutil.copy(source, staging / name)
            copied.append(name)
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model")):
        LOG.warning("model `%s` has no tokenizer files; the merged model has no tokenizer", donor.reference)


def _log_summary(report: MergeReport) -> None:
    LOG.info("merged %d tensors (%.2f GB) with %s in %.1f s into %s", report.tensors, report.bytes_written / 1e9, report.method, report.seconds, report.out_dir)
    if report.slerp:
        cosines = [r.cosine for r in report.slerp]
        fallbacks = [r.name for r in report.slerp if r.linear_fallback]
        LOG.info("slerp: %d/%d tensors fell back to linear interpolation (|cos| > 0.9995); cos min %.6f, median %.6f, max %.6f",
                 len(fallbacks), len(cosines), min(cosines), statistics.median(cosines), max(cosines))


def run_merge(
    config: MergeConfig | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    out_shard_size: str | int = "5GB",
    seed: int = 0,
    drop_masks: DropMasks | None = None,
) -> MergeReport:
    """Merge the models a mergekit config describes into an HF directory at `out_dir`.

    `seed` drives DARE's drop masks; `drop_masks` replaces them outright (tests inject masks).
    """
    started = time.perf_counter()
    if not isinstance(config, MergeConfig):
        config = load_merge_config(config)
    method = method_spec(config.merge_method)
    jax_device = merge_device(device)
    models = open_models(config)
    vocabulary = build_output_vocabulary(config, models, tokenizer_source_model(config, models))
    plan = plan_merge(config, method, models, vocabulary_rows=vocabulary.rows if vocabulary else None)
    report = MergeReport(Path(out_dir), method.name, seed)
    drop_masks = drop_masks or SeededDropMasks(seed)

    with atomic_output_dir(out_dir) as staging, logging_redirect_tqdm(), jax.default_device(jax_device):
        _write_tensors(plan, models, staging, jax_device, parse_size(out_shard_size), drop_masks, report, vocabulary)
        donor = donor_model(config, models)
        (staging / "config.json").write_text(json.dumps(_output_config(donor, plan, vocabulary), indent=2) + "\n")
        if vocabulary is not None:
            vocabulary.tokenizer.save_pretrained(str(staging))
        else:
            _copy_tokenizer(donor, staging)
        summary = {"merge_method": method.name, "seed": seed, "slerp": [vars(r) for r in report.slerp]}
        (staging / "bmx_merge_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.seconds = time.perf_counter() - started
    _log_summary(report)
    return report


def run_merge_to_bmx(config: MergeConfig | str | Path, out_dir: str | Path, **options) -> MergeReport:
    """`run_merge`, then convert the HF result into a bmx checkpoint at `out_dir` (`--to-bmx`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new output directory")
    hf_dir = out_dir.with_name(f".{out_dir.name}.hf-{os.getpid()}")
    try:
        report = run_merge(config, hf_dir, **options)
        hf_to_bmx(hf_dir, out_dir)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    report.out_dir = out_dir
    return report
