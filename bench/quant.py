"""Quantized vs bfloat16 side by side: memory, held-out perplexity, medical QA accuracy, speed.

Each quantized method is `python -m bmx.quant` (`quantize_checkpoint`) on the float checkpoint as
stored, so AWQ searches and folds its scales in float32 from the float32 weights; its checkpoint is
loaded back through `bmx.model.load` (what `bmx.eval` does) with bfloat16 float parameters
(embedding, norms, LM head), as the bf16 model is loaded. Then each model is measured:
- bytes per parameter: every array the model holds on the device ÷ the float parameter count,
  for the whole model and for the decoder linears alone (what the methods quantize);
- perplexity on held-out text, and the mean KL divergence per token from the bf16 model's
  next-token distribution to the method's on the same tokens: `--heldout DIR`, every split of a
  `python -m bmx.data prepare` dataset the model was not trained on (by default the validation
  split of `--data`, which with few documents is a small and narrow sample); Δ ppl comes with the
  standard error of its mean over the held-out sequences (paired with the bf16 model's, clustered
  by article); and the softmax temperature at which each model's held-out perplexity would be
  lowest (T*, from a parabola through T = 0.9 … 1.1). Perplexity is a fair measure of quantization
  loss only when the bf16 model is calibrated on the held-out text (T* ≈ 1): at T* ≠ 1 the noise a
  method adds, which flattens the distributions, moves perplexity towards its optimum, so the
  noisier method can "win". Δ ppl at T*
  compares each model at its own best temperature, which removes that effect.
  `--calibrate-temperature` removes it at the source instead: every method then quantizes a copy of
  the model whose LM head is divided by the bf16 model's T* on the held-out sequences left unscored
  (temperature scaling, one number fitted on text disjoint from what is scored);
- accuracy on real questions from ../shared/data/eval through `bmx.eval` (3-shot, the likeliest
  option letter by default; `--protocol biomistral` for the paper's generated letter), the first
  N questions of each of four tasks;
- forward throughput: tokens per second of a jitted forward on a [batch, seq] block, all models
  timed round-robin, best of 7 rounds;
- quantize time: the wall time of `quantize_checkpoint` (load, calibrate, quantize, write).
`rtn` is AWQ's 4-bit format with round-to-nearest instead of the activation-aware search (the same
group size): the baseline AWQ has to beat.

    python -m bmx.data prepare ../shared/data/pmc_oa --out runs/pmc512v15 --seq-len 512 --val-fraction 0.15
    python -m bmx.train --config configs/quant_bench.yaml   # ~35 min on 2 CPU cores
    python bench/quant.py --ckpt runs/quant_bench512/model --data runs/pmc512v15 --calibrate-temperature \
        --heldout-tokens 120000 [--questions 75]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmx.checkpoints import load
from bmx.eval.evaluate import EvalModel, EvalSettings, evaluate_tasks
from bmx.eval.scorers import JaxModelScorer
from bmx.model.checkpoint import read_config, read_params, write_checkpoint
from bmx.quant import parameter_bytes
from bmx.quant.model import LINEAR_PATHS, linear_at
from bmx.quant.pipeline import quantize_checkpoint
from bmx.tasks.catalog import load_tasks, resolve_tasks
from bmx.tokenizer import load_tokenizer

METHODS = ("bf16", "int8", "nf4", "fp4", "rtn", "awq", "rtn@64", "awq@64")
TASKS = "medqa,medmcqa,pubmedqa,mmlu_clinical_knowledge"
TEMPERATURES = (0.9, 0.95, 1.0, 1.05, 1.1)  # where held-out loss is measured to find each model's best one


def linear_bytes_per_param(model) -> float:
    total_bytes = total_params = 0
    for path in LINEAR_PATHS:
        linear = linear_at(model.model.layers, path)
        total_bytes += parameter_bytes(linear)
        shape = linear.kernel.shape if hasattr(linear, "kernel") else None
        if shape is None:
            per_layer = int(np.prod(linear.in_shape)) * int(np.prod(linear.out_shape))
            shape = (model.config.num_hidden_layers, per_layer)
        total_params += int(np.prod(shape))
    return total_bytes / total_params


@dataclass
class HeldOut:
    """Token sequences no model here was trained or calibrated on, and what they are."""

    records: np.ndarray  # [sequences, fields, seq_len], as stored by `bmx.data prepare`
    fields: list[str]
    description: str  # e.g. "pubmed512 (all splits)", for the table
    documents: np.ndarray  # [sequences]: the document each sequence starts in (errors cluster by it)

    def batches(self, batch: int):
        from bmx.data.loader import batch_features

        for start in range(0, len(self.records), batch):
            yield batch_features(self.records[start:start + batch], self.fields)

    def split(self, max_tokens: int | None, seed: int = 0) -> tuple[HeldOut, HeldOut | None]:
        """A seeded random subset of whole sequences holding about `max_tokens` scored tokens, and the
        sequences left over (None when the subset is everything)."""
        seq_len = self.records.shape[-1]
        if max_tokens is None or max_tokens >= len(self.records) * (seq_len - 1):
            return self, None
        order = np.random.default_rng(seed).permutation(len(self.records))
        chosen = -(-max_tokens // (seq_len - 1))
        scored, rest = np.sort(order[:chosen]), np.sort(order[chosen:])
        return (HeldOut(self.records[scored], self.fields, self.description, self.documents[scored]),
                HeldOut(self.records[rest], self.fields, f"{self.description}, the rest", self.documents[rest]))


def read_held_out(data_dir: Path, splits: list[str] | None) -> HeldOut:
    """The sequences of `splits` (every split when None) of a prepared dataset."""
    import grain

    from bmx.data.manifest import read_manifest, record_layout, shard_paths
    from bmx.data.shards import decode_record

    manifest = read_manifest(data_dir)
    fields, seq_len, dtype = record_layout(manifest)
    splits = splits or sorted(manifest["splits"])
    records = []
    for split in splits:
        source = grain.sources.ArrayRecordDataSource(shard_paths(data_dir, split))
        records += [decode_record(source[index], len(fields), seq_len, dtype) for index in range(len(source))]
    which = "all splits" if len(splits) == len(manifest["splits"]) else " + ".join(splits)
    records = np.stack(records)
    return HeldOut(records, fields, f"{Path(data_dir).name} ({which})",
                   starting_documents(records[:, fields.index("tokens")], manifest["tokenizer"]["bos_id"]))


def starting_documents(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """For packed sequences `[sequences, seq_len]` in stored order, where every document begins with
    BOS: the index of the document each sequence's first token belongs to."""
    documents_begun = np.cumsum((tokens == bos_id).sum(axis=1))  # up to the end of each sequence
    before = np.concatenate([[0], documents_begun[:-1]])
    return np.maximum(before + (tokens[:, 0] == bos_id) - 1, 0)


def held_out_quality(model, reference, held_out: HeldOut, batch: int = 4) -> dict:
    """The perplexity of `model` on `held_out`, the mean per token of KL(reference ‖ model) between
    next-token distributions (0 without a reference), the tokens scored, and each sequence's summed
    loss (`sequence_losses`, for paired standard errors).

    At this model size a 4-bit method moves the perplexity by a fraction of a percent either way;
    the KL divergence to the bf16 model measures how far each method moved it at all."""

    def target_losses(logits, targets):
        log_probs = jax.nn.log_softmax(logits)
        return log_probs, -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

    @nnx.jit
    def token_sums(model, reference, inputs, targets, mask):
        logits = model(inputs).astype(jnp.float32)
        log_probs, losses = target_losses(logits, targets)
        if reference is None:
            kl = jnp.zeros_like(losses)
        else:
            reference_log_probs = jax.nn.log_softmax(reference(inputs).astype(jnp.float32))
            kl = jnp.sum(jnp.exp(reference_log_probs) * (reference_log_probs - log_probs), axis=-1)
        tempered = jnp.stack([jnp.sum(target_losses(logits / t, targets)[1] * mask, axis=-1)
                              for t in TEMPERATURES], axis=-1)
        return jnp.sum(losses * mask, axis=-1), jnp.sum(kl * mask), jnp.sum(mask), tempered

    sequence_losses, kl_sum, count, tempered_losses = [], 0.0, 0.0, []
    for features in held_out.batches(batch):
        losses, kl, n, tempered = token_sums(model, reference,
                                             *(jnp.asarray(features[k]) for k in ("inputs", "targets", "loss_mask")))
        sequence_losses.append(np.asarray(losses, np.float64))
        tempered_losses.append(np.asarray(tempered, np.float64))
        kl_sum, count = kl_sum + float(kl), count + float(n)
    sequence_losses = np.concatenate(sequence_losses)
    return {"perplexity": float(np.exp(sequence_losses.sum() / count)), "kl_to_bf16": kl_sum / count,
            "perplexity_tokens": int(count), **best_temperature(np.concatenate(tempered_losses), count),
            "sequence_losses": sequence_losses}


def best_temperature(tempered_losses: np.ndarray, count: float) -> dict:
    """The softmax temperature T* minimising the held-out loss, from the least-squares parabola through
    the mean loss per token at each of `TEMPERATURES` (`tempered_losses`: each sequence's summed loss
    at each), and the perplexity there. The parabola's value at T* is a fixed weighting of the losses
    at the grid points, so each sequence's loss at T* is that weighting of its own (for paired errors)."""
    grid = np.vander(np.asarray(TEMPERATURES), 3)  # columns T², T, 1
    fit = np.linalg.pinv(grid)  # parabola coefficients from losses at the grid points
    curvature, slope, _ = fit @ (tempered_losses.sum(axis=0) / count)
    best = -slope / (2 * curvature)
    at_best = tempered_losses @ (np.array([best ** 2, best, 1.0]) @ fit)
    return {"best_temperature": float(best), "perplexity_at_best_temperature": float(np.exp(at_best.sum() / count)),
            "sequence_losses_at_best_temperature": at_best}


def temperature_calibrated(ckpt: Path, held_out: HeldOut, out: Path) -> tuple[Path, float]:
    """A copy of the float checkpoint `ckpt` with its LM head divided by T, the softmax temperature at
    which the bf16 model's perplexity on `held_out` is lowest (temperature scaling), and T.

    Fitted on held-out sequences that are never scored, this makes the model every method quantizes
    calibrated on unseen text, so that perplexity measures only the damage quantization does (see
    the module docstring). The decoder linears, which the methods quantize, are untouched."""
    model, _ = load(ckpt, dtype="bfloat16")
    temperature = held_out_quality(model, None, held_out)["best_temperature"]
    params = read_params(ckpt)
    if "lm_head" not in params:
        raise ValueError(f"{ckpt}: no separate LM head to fold a temperature into (tied embeddings)")
    params["lm_head"]["kernel"] = (np.asarray(params["lm_head"]["kernel"], np.float32) / temperature).astype(
        params["lm_head"]["kernel"].dtype)
    write_checkpoint(out, read_config(ckpt), params)
    return out, temperature


def perplexity_change_error(row: dict, base: dict, documents: np.ndarray, at_best_temperature: bool = False) -> float:
    """Standard error of `row`'s perplexity minus `base`'s on the held-out sequences (paired: the same
    sequences), by the delta method on the mean loss per token; at each model's T* if asked.

    Clustered by document (`documents`: each sequence's): the sequences of one article share its
    vocabulary and style, so they do not err independently, and an error that treated them so
    would be too small."""
    suffix = "_at_best_temperature" if at_best_temperature else ""
    differences = row["sequence_losses" + suffix] - base["sequence_losses" + suffix]
    _, cluster_of = np.unique(documents, return_inverse=True)
    clusters = cluster_of.max() + 1
    deviations = np.bincount(cluster_of, weights=differences - differences.mean(), minlength=clusters)
    total_error = np.sqrt(clusters / (clusters - 1) * np.sum(deviations ** 2))
    return row["perplexity" + suffix] * float(total_error / row["perplexity_tokens"])


def accuracy(model, name: str, tokenizer, tasks, questions_per_task: int, protocol: str) -> tuple[float, int]:
    settings = EvalSettings(protocol=protocol, shots=3, seeds=1, limit=questions_per_task, progress=False)
    outcomes = evaluate_tasks([EvalModel(name, JaxModelScorer(model), tokenizer)], tasks, settings)
    answered = sum(outcome.summary["n"] for outcome in outcomes)
    correct = sum(outcome.summary["acc"] * outcome.summary["n"] for outcome in outcomes)
    return correct / answered, answered


def tokens_per_second(models: dict, batch: int, seq: int, rounds: int = 7) -> dict[str, float]:
    """Forward throughput of each model, timed round-robin (one forward each per round) so that a
    change in the machine's load hits every model alike; the best round counts."""
    forward = nnx.jit(lambda model, ids: model(ids))
    any_model = next(iter(models.values()))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, any_model.config.vocab_size, (batch, seq)), jnp.int32)
    for model in models.values():
        forward(model, ids).block_until_ready()  # compile
    best = {label: np.inf for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            start = time.perf_counter()
            forward(model, ids).block_until_ready()
            best[label] = min(best[label], time.perf_counter() - start)
    return {label: batch * seq / seconds for label, seconds in best.items()}


def run_method(label: str, float_ckpt: Path, args, work: Path, tasks, tokenizer, held_out: HeldOut, reference):
    """`label` is a method, optionally with its own group size: `awq@64`; `reference` is the bf16 model."""
    method, _, group_size = label.partition("@")
    ckpt, seconds = float_ckpt, 0.0
    if method != "bf16":
        start = time.perf_counter()
        ckpt = quantize_checkpoint(float_ckpt, work / label, method, group_size=int(group_size or args.group_size),
                                   double_quant=args.double_quant, calib=args.data if method == "awq" else None,
                                   calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, progress=False)
        seconds = time.perf_counter() - start
    model, config = load(ckpt, dtype="bfloat16")
    quality = held_out_quality(model, None if method == "bf16" else reference, held_out)
    acc, answered = accuracy(model, method, tokenizer, tasks, args.questions, args.protocol)
    row = {"method": label, "bytes_per_param": parameter_bytes(model) / config.num_parameters(),
           "linear_bytes_per_param": linear_bytes_per_param(model), **quality, "accuracy": acc,
           "questions": answered, "quantize_seconds": seconds}
    print(json.dumps(printable(row)), flush=True)
    return row, model


def printable(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith("sequence_losses")}


def table(rows: list[dict], held_out: HeldOut) -> str:
    base = next((row for row in rows if row["method"] == "bf16"), rows[0])
    lines = [f"| method | bytes/param (model) | bytes/param (linears) | ppl, {held_out.description} | Δ ppl ± s.e. "
             f"| KL to bf16 (nats/token) | T* | Δ ppl at T* | accuracy ({rows[0]['questions']} q) | forward tokens/s "
             "| quantize time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        change = f"{row['perplexity'] - base['perplexity']:+.2f}"
        change_at_best = f"{row['perplexity_at_best_temperature'] - base['perplexity_at_best_temperature']:+.2f}"
        if row is not base:
            change += f" ± {perplexity_change_error(row, base, held_out.documents):.2f}"
            change_at_best += f" ± {perplexity_change_error(row, base, held_out.documents, True):.2f}"
        lines.append(f"| {row['method']} | {row['bytes_per_param']:.3f} | {row['linear_bytes_per_param']:.3f} | "
                     f"{row['perplexity']:.2f} | {change} | {row['kl_to_bf16']:.2e} | {row['best_temperature']:.3f} | "
                     f"{change_at_best} | {100 * row['accuracy']:.1f}% | {row['tokens_per_second']:,.0f} | "
                     f"{row['quantize_seconds']:.1f} s |")
    return "\n".join(lines)


def awq_against_round_to_nearest(rows: list[dict], default_group_size: int, documents: np.ndarray) -> str:
    """AWQ's perplexity minus RTN's at each group size both ran at, with the paired standard error:
    the comparison the AWQ search has to win."""
    by_method = {row["method"]: row for row in rows}
    lines = []
    for label, awq in by_method.items():
        rtn = by_method.get(label.replace("awq", "rtn"))
        if not label.startswith("awq") or rtn is None:
            continue
        group = label.partition("@")[2] or default_group_size
        lines.append(f"awq − rtn, group {group}: {awq['perplexity'] - rtn['perplexity']:+.3f} "
                     f"± {perplexity_change_error(awq, rtn, documents):.3f} ppl, at each model's T*: "
                     f"{awq['perplexity_at_best_temperature'] - rtn['perplexity_at_best_temperature']:+.3f} "
                     f"± {perplexity_change_error(awq, rtn, documents, True):.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="float bmx checkpoint")
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset: its train split calibrates")
    parser.add_argument("--heldout", type=Path, help="prepared dataset never trained on: all its splits measure "
                                                     "perplexity (default: the validation split of --data)")
    parser.add_argument("--heldout-tokens", type=int, help="score a random subset of about this many held-out "
                                                           "tokens (whole sequences; default: all)")
    parser.add_argument("--calibrate-temperature", action="store_true",
                        help="first divide the LM head by the temperature that minimises the bf16 model's "
                             "perplexity on the held-out sequences --heldout-tokens leaves unscored")
    parser.add_argument("--eval-data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"))
    parser.add_argument("--methods", default=",".join(METHODS), help="METHOD or METHOD@GROUP_SIZE, comma-separated")
    parser.add_argument("--questions", type=int, default=75, help="per task (4 tasks)")
    parser.add_argument("--protocol", default="loglik", choices=("loglik", "biomistral"),
                        help="loglik: the likeliest option letter (a small model rarely emits a letter at all)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    tasks = load_tasks(resolve_tasks(TASKS), args.eval_data)
    tokenizer = load_tokenizer()
    held_out, unscored = read_held_out(args.heldout or args.data, None if args.heldout else ["validation"]).split(
        args.heldout_tokens)
    if args.calibrate_temperature and unscored is None:
        parser.error("--calibrate-temperature fits T on the held-out sequences left unscored: pass a "
                     "--heldout-tokens smaller than the held-out set")
    work = Path(tempfile.mkdtemp(prefix="bmx-bench-quant-"))
    try:
        float_ckpt, temperature = Path(args.ckpt), None
        if args.calibrate_temperature:
            float_ckpt, temperature = temperature_calibrated(float_ckpt, unscored, work / "calibrated")
            print(f"temperature scaling: T = {temperature:.4f}, fitted on {len(unscored.records)} unscored "
                  f"held-out sequences", flush=True)
        reference, _ = load(float_ckpt, dtype="bfloat16")
        results = [run_method(method, float_ckpt, args, work, tasks, tokenizer, held_out, reference)
                   for method in args.methods.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speeds = tokens_per_second({row["method"]: model for row, model in results}, args.batch, args.seq)
    rows = [{**row, "tokens_per_second": speeds[row["method"]]} for row, _ in results]
    if args.json:
        # Per-sequence losses and their documents too, so that errors can be recomputed without a rerun.
        stored = [{key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in row.items()}
                  for row in rows]
        args.json.write_text(json.dumps({"held_out": held_out.description, "documents": held_out.documents.tolist(),
                                         "rows": stored}) + "\n")
    scaling = f", LM head ÷ {temperature:.4f} (temperature scaling)" if temperature else ""
    print(f"\n{jax.devices()[0].device_kind}, group size {args.group_size} (or METHOD@N's), calibration "
          f"{args.calib_samples}×{args.calib_seq_len} tokens, perplexity on {rows[0]['perplexity_tokens']:,} tokens "
          f"of {held_out.description}{scaling}, {args.protocol} protocol\n")
    print(table(rows, held_out))
    print("\n" + awq_against_round_to_nearest(rows, args.group_size, held_out.documents))


if __name__ == "__main__":
    main()
