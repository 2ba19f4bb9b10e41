"""Wall time and peak RSS of `python -m bmx.merge` vs mergekit 0.1.5 on the same merge, for any method.

Random Mistral-shaped bfloat16 models are written straight to safetensors (no transformers, no
torch): `base`, and fine-tunes of it (`base` + small noise) as the method needs. Both tools then run
the same YAML (or extract-lora), each in its own subprocess whose peak resident set size is read
from `os.wait4`. Deterministic methods' outputs are compared tensor by tensor (bf16 outputs: at
most about one bf16 step apart). Everything is written under a temporary directory that is removed
at the end unless --keep.

    python bench/merge.py                          # BioMistral's SLERP, ~1B parameters (2 GB per model)
    python bench/merge.py --method della           # any mergekit method, or extract-lora (--rank 64)
    python bench/merge.py --size 100m --method model_stock   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml
from tqdm import tqdm

from bmx.convert.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter, TensorSpec, atomic_output_dir, parse_size
from bmx.merge.architecture import MISTRAL

# Mistral-shaped sizes: (hidden, intermediate, layers, attention heads, kv heads); vocabulary 32000.
SIZES = {
    "1b": (2048, 7168, 16, 16, 4),
    "100m": (768, 2688, 8, 12, 4),
    "tiny": (256, 768, 4, 4, 2),
}
VOCAB = 32000
SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def mistral_hf_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = {
        "input_layernorm": (hidden,), "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden), "post_attention_layernorm": (hidden,),
        "mlp.up_proj": (inter, hidden), "mlp.gate_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    for layer in range(config["num_hidden_layers"]):
        for part, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{part}.weight"] = shape
    return [(name, shapes[name]) for name in MISTRAL.all_names(config["num_hidden_layers"])]


def write_random_model(directory: Path, config: dict, seed: int, like: Path | None = None, noise: float = 0.002) -> int:
    """A random bfloat16 checkpoint (norms near 1, matrices N(0, 0.02)); returns its parameter count.

    With `like`, that model's weights plus N(0, noise) (a fine-tune of it: the task-vector methods
    and extract-lora see small deltas, as they do on real fine-tunes).
    """
    rng = np.random.default_rng(seed)
    specs = [TensorSpec(name, shape, np.dtype(ml_dtypes.bfloat16)) for name, shape in tensor_shapes(config)]
    start = SafetensorsReader(like) if like is not None else None
    with atomic_output_dir(directory) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size("2GB"))
        for spec in tqdm(specs, desc=f"generate {directory.name}", unit="tensor"):
            values = rng.standard_normal(spec.shape, dtype=np.float32)
            if start is not None:
                values = np.asarray(start.read(spec.name), np.float32) + noise * values
            else:
                values = 1 + 0.1 * values if len(spec.shape) == 1 else 0.02 * values
            writer.write(spec.name, values.astype(ml_dtypes.bfloat16))
            del values
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config, indent=2))
    return sum(int(np.prod(spec.shape)) for spec in specs)


# Per method: the models it merges (fine-tunes of `base`, or `other`, an unrelated model) and its parameters.
def method_config(method: str, workdir: Path, layers: int) -> dict:
    path = lambda name: str(workdir / name)  # noqa: E731
    if method == "slerp":
        return {"slices": [{"sources": [{"model": path(m), "layer_range": [0, layers]} for m in ("base", "tuned_a")]}],
                "merge_method": "slerp", "base_model": path("base"), "parameters": {"t": SLERP_T}, "dtype": "bfloat16"}
    if method == "passthrough":  # a frankenmerge, deeper than its inputs: layers 0..L/2+2 of one, L/2-2..L of the other
        half = layers // 2
        return {"slices": [{"sources": [{"model": path("base"), "layer_range": [0, half + 2]}]},
                           {"sources": [{"model": path("tuned_a"), "layer_range": [half - 2, layers]}]}],
                "merge_method": "passthrough", "dtype": "bfloat16"}
    weighted = {"weight": 0.5, "density": 0.5}
    per_method = {
        "linear": (["base", "tuned_a", "tuned_b"], {"weight": 1.0}, None),
        "karcher": (["base", "tuned_a", "tuned_b"], {}, None),
        "multislerp": (["tuned_a", "tuned_b"], {"weight": 0.5}, "base"),
        "nuslerp": (["tuned_a", "tuned_b"], {"weight": 0.5}, "base"),
        "model_stock": (["tuned_a", "tuned_b", "tuned_c"], {}, "base"),
        "nearswap": (["tuned_a"], {}, "base"),
        "arcee_fusion": (["tuned_a"], {}, "base"),
    }
    models, parameters, base = per_method.get(method, (["tuned_a", "tuned_b"], weighted if method not in ("sce", "ram", "ramplus_tl") else {}, "base"))
    if method in ("task_arithmetic",):
        parameters = {"weight": 0.5}
    config = {"models": [{"model": path(m), **({"parameters": parameters} if parameters else {})} for m in models],
              "merge_method": method, "dtype": "bfloat16"}
    if base:
        config["base_model"] = path(base)
    if method == "nearswap":
        config["parameters"] = {"t": 0.001}
    return config


RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")  # each tool draws its own masks
MODELS_NEEDED = {"base", "tuned_a", "tuned_b"}


@dataclass
class Measurement:
    tool: str
    seconds: float
    peak_rss_bytes: int
    cpu_seconds: float  # user + system: fairer than wall time on a machine shared with other jobs


def measure(tool: str, command: list[str], env: dict) -> Measurement:
    """Run `command` in its own process; wall time and that process's peak RSS (ru_maxrss, KiB on Linux)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_lines = []
    for line in process.stderr:
        stderr_lines.append(line)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write("".join(stderr_lines[-30:]))
        raise RuntimeError(f"{tool} failed with exit code {process.returncode}: {' '.join(command)}")
    return Measurement(tool, seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def compare_outputs(ours: Path, reference: Path) -> tuple[float, float]:
    """(largest |difference|, fraction of entries more than one bf16 step apart) over all tensors."""
    a, b = SafetensorsReader(ours), SafetensorsReader(reference)
    if sorted(a.names()) != sorted(b.names()):
        raise AssertionError("the two outputs hold different tensors")
    largest, off, total = 0.0, 0, 0
    for name in b.names():
        x, y = np.asarray(a.read(name), np.float32), np.asarray(b.read(name), np.float32)
        difference = np.abs(x - y)
        largest = max(largest, float(difference.max()))
        off += int(np.count_nonzero(difference > 2**-7 * np.abs(y) + 1e-6))
        total += y.size
    return largest, off / total


def commands(method: str, workdir: Path, models: Path, layers: int, rank: int) -> tuple[list[str], list[str]]:
    """(bmx command, mergekit command) for one method on the models in `models`, YAML and outputs in `workdir`."""
    out_bmx, out_mergekit = str(workdir / "out_bmx"), str(workdir / "out_mergekit")
    if method == "extract-lora":
        base, tuned = str(models / "base"), str(models / "tuned_a")
        return ([sys.executable, "-m", "bmx.merge", "extract-lora", base, tuned, out_bmx, "--rank", str(rank), "--quiet"],
                [shutil.which("mergekit-extract-lora") or "mergekit-extract-lora", "--model", tuned, "--base-model", base,
                 "--out-path", out_mergekit, "--max-rank", str(rank), "--quiet"])
    config_file = workdir / f"{method}.yaml"
    config_file.write_text(yaml.safe_dump(method_config(method, models, layers), sort_keys=False))
    return ([sys.executable, "-m", "bmx.merge", str(config_file), out_bmx, "--quiet"],
            [shutil.which("mergekit-yaml") or "mergekit-yaml", str(config_file), out_mergekit, "--quiet"])


def main(argv: list[str] | None = None) -> int:
    from bmx.merge.method_specs import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--method", default="slerp", choices=sorted(METHODS) + ["extract-lora"], help="what to time (default: BioMistral's SLERP)")
    parser.add_argument("--rank", type=int, default=64, help="extract-lora's rank")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write models and outputs (default: a temp dir)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="keep the generated models here and reuse them on later runs (default: inside the work dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    args = parser.parse_args(argv)

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bmx-merge-bench-", dir=args.workdir))
    try:
        config = mistral_hf_config(*SIZES[args.size])
        models = args.models_dir / args.size if args.models_dir else workdir
        needed = {"tuned_a"} if args.method in ("slerp", "passthrough", "extract-lora", "nearswap", "arcee_fusion") else {"tuned_a", "tuned_b"}
        if args.method == "model_stock":
            needed.add("tuned_c")
        seeds = {"base": 0, "tuned_a": 1, "tuned_b": 2, "tuned_c": 3}
        for name in ["base", *sorted(needed)]:
            existing = models / name / "config.json"
            if not (existing.is_file() and json.loads(existing.read_text()) == config):
                shutil.rmtree(models / name, ignore_errors=True)  # another size or a partial one
                write_random_model(models / name, config, seed=seeds[name], like=None if name == "base" else models / "base")
        parameters = sum(int(np.prod(shape)) for _, shape in tensor_shapes(config))
        layers = config["num_hidden_layers"]
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "HF_HUB_OFFLINE": "1"}
        ours, theirs = commands(args.method, workdir, models, layers, args.rank)
        results = [measure("bmx (`python -m bmx.merge`)", ours, env), measure("mergekit 0.1.5", theirs, env)]

        print(f"\n{args.method} of {parameters / 1e9:.2f}B-parameter Mistral-shaped bf16 models "
              f"({layers} layers, {2 * parameters / 1e9:.1f} GB each), {os.cpu_count()} CPU cores:\n")
        print("| tool | wall time (s) | CPU time (s) | peak RSS (GB) |")
        print("|---|---:|---:|---:|")
        for result in results:
            print(f"| {result.tool} | {result.seconds:.1f} | {result.cpu_seconds:.1f} | {result.peak_rss_bytes / 1e9:.2f} |")
        ours, theirs = results
        print(f"| ratio bmx / mergekit | {ours.seconds / theirs.seconds:.2f}x | {ours.cpu_seconds / theirs.cpu_seconds:.2f}x | "
              f"{ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f}x |")
        print(f"\nload average during the run: {os.getloadavg()[0]:.1f} (1 min)")
        if args.method == "extract-lora" or args.method in RANDOM_METHODS:
            print("\noutputs not compared (random masks, or SVD factors defined up to sign; the tests check parity)")
        else:
            largest, off = compare_outputs(workdir / "out_bmx", workdir / "out_mergekit")
            print(f"\noutputs agree: largest |difference| {largest:.3g}, {off:.2e} of entries more than one bf16 step apart")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
