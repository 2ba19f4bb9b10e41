"""Questions per second: bmx vs lm-eval-harness's HF backend, same random Mistral, same task, same run.

    python bench/eval.py                          # MedQA, 300 questions, tiny model (hidden 64, 2 layers)
    python bench/eval.py --limit 1273 --hidden 256 --layers 4

The task is lm-eval's own `medqa_4options` definition pointed at the shared MedQA file (0-shot,
four one-token continuations per question). Timed, each after its model is loaded:
1. lm-eval + its HF backend (PyTorch), `--batch-size` sequences per forward;
2. lm-eval + the `bmx` backend (JAX), first run (compiles) and again warm;
3. `bmx.eval`'s own loglik protocol (no lm-eval in the loop), first run and warm.
The per-option scores of 1 and 2 are compared, so a fast wrong answer cannot pass unnoticed.

Then the cold start, each in a fresh Python process (what a user running one command waits for):
lm-eval's HF backend; `bmx.eval` with an empty persistent compilation cache; `bmx.eval` again, the
cache now filled by the previous run. Each row gives the evaluation time (after the model is loaded)
and the whole process's wall time (imports and model loading included).
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EVAL_DATA = REPO.parent / "shared" / "data" / "eval"
MEDQA_FILE = "medqa/US_4_options_phrases_no_exclude_test.jsonl"

DOCS_PY = '''
def medqa_to_gbaker(dataset):
    return dataset.map(lambda d: {"sent1": d["question"], "label": "ABCD".index(d["answer_idx"]),
                                  **{f"ending{i}": d["options"][l] for i, l in enumerate("ABCD")}})
'''


def build_hf_model(directory: Path, hidden: int, layers: int) -> Path:
    """A random Mistral with the Mistral v0.1 vocabulary, and that tokenizer as an HF tokenizer."""
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    from bmx.tokenizer import mistral_v01_model_path

    sentencepiece_dir = directory / "_sentencepiece"
    sentencepiece_dir.mkdir(parents=True)
    shutil.copy(mistral_v01_model_path(), sentencepiece_dir / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(sentencepiece_dir), add_bos_token=True)
    shutil.rmtree(sentencepiece_dir)
    torch.manual_seed(0)
    heads = max(hidden // 32, 2)
    config = MistralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           max_position_embeddings=4096, sliding_window=4096)
    MistralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def task_manager(folder: Path, data_dir: Path):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.py").write_text(DOCS_PY)
    (folder / "bench_medqa.yaml").write_text(f"""task: bench_medqa
include: {Path(lm_eval.tasks.__file__).parent / 'medqa' / 'medqa.yaml'}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_dir / MEDQA_FILE}
training_split: null
validation_split: null
test_split: test
process_docs: !function docs.medqa_to_gbaker
""")
    return TaskManager(include_path=str(folder), include_defaults=False)


def timed_lm_eval(lm, manager, limit: int) -> tuple[float, np.ndarray, float]:
    import lm_eval

    start = time.perf_counter()
    output = lm_eval.simple_evaluate(model=lm, tasks=["bench_medqa"], limit=limit, task_manager=manager,
                                     log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - start
    samples = sorted(output["samples"]["bench_medqa"], key=lambda s: s["doc_id"])
    scores = np.array([[float(loglik) for loglik, _ in s["filtered_resps"]] for s in samples])
    return seconds, scores, output["results"]["bench_medqa"]["acc,none"]


def fresh_process(side: str, model_dir: Path, args, manager_dir: Path | None = None,
                  cache: Path | None = None) -> dict:
    """Run one side in a new interpreter; its own timings plus the whole process's wall time."""
    command = [sys.executable, __file__, "--child", side, "--child-model", str(model_dir), "--limit", str(args.limit),
               "--batch-size", str(args.batch_size), "--tokens-per-batch", str(args.tokens_per_batch),
               "--data-dir", str(args.data_dir)]
    if manager_dir is not None:
        command += ["--child-tasks", str(manager_dir)]
    env = {**os.environ, "BMX_COMPILE_CACHE": str(cache) if cache else "off", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{completed.stderr[-3000:]}")
    return {**json.loads(completed.stdout.strip().splitlines()[-1]), "wall_s": wall}


def child(args) -> None:
    """One side of the cold-start comparison, run by `fresh_process`; prints one JSON line."""
    start = time.perf_counter()
    if args.child == "lm-eval":
        import lm_eval  # noqa: F401  (imported before the clock's "loaded" mark, as bmx's imports are)
        from lm_eval.models.huggingface import HFLM

        from bmx.tokenizer import mistral_v01_model_path  # noqa: F401  (same imports as the parent)

        manager = task_manager(args.child_tasks, args.data_dir)
        lm = HFLM(pretrained=args.child_model, dtype="float32", device="cpu", batch_size=args.batch_size)
        loaded = time.perf_counter()
        seconds, _, accuracy = timed_lm_eval(lm, manager, args.limit)
    else:
        from bmx.compile_cache import enable_compile_cache

        enable_compile_cache()  # what every bmx command does first ($BMX_COMPILE_CACHE set by the parent)
        from bmx.eval.evaluate import EvalSettings, evaluate_task
        from bmx.eval.models import load_eval_model
        from bmx.tasks.catalog import load_task

        task = load_task("medqa", args.data_dir)
        model = load_eval_model(args.child_model)
        loaded = time.perf_counter()
        settings = EvalSettings(protocol="loglik", shots=0, limit=args.limit, tokens_per_batch=args.tokens_per_batch,
                                progress=False)
        accuracy = evaluate_task([model], task, settings).summary["acc"]
        seconds = time.perf_counter() - loaded
    print(json.dumps({"load_s": loaded - start, "eval_s": seconds, "acc": accuracy}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=300, help="MedQA questions (1273 in all)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval HF backend's batch size")
    parser.add_argument("--tokens-per-batch", type=int, default=8192, help="bmx's padded tokens per forward")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("BMX_EVAL_DATA", EVAL_DATA)))
    parser.add_argument("--skip-in-process", action="store_true", help="only the fresh-process (cold start) rows")
    parser.add_argument("--child", choices=("lm-eval", "bmx"), help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-tasks", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.child:
        return child(args)

    from bmx.convert import hf_to_bmx

    with tempfile.TemporaryDirectory(prefix="bmx-bench-eval-") as scratch:
        scratch = Path(scratch)
        hf_dir = build_hf_model(scratch / "hf", args.hidden, args.layers)
        ckpt = hf_to_bmx(hf_dir, scratch / "bmx", progress=False)
        manager = task_manager(scratch / "tasks", args.data_dir)
        rows = [] if args.skip_in_process else in_process_rows(args, hf_dir, ckpt, manager)
        cache = scratch / "jax_cache"
        cold = [("lm-eval, HF backend (PyTorch)", fresh_process("lm-eval", hf_dir, args, scratch / "tasks")),
                ("bmx.eval loglik, empty compilation cache", fresh_process("bmx", ckpt, args, cache=cache)),
                ("bmx.eval loglik, second run (cache filled)", fresh_process("bmx", ckpt, args, cache=cache))]
        cache_files = sum(1 for _ in cache.iterdir())

    import jax

    import torch

    print(f"\nMedQA, {args.limit} questions x 4 options, random Mistral hidden {args.hidden}, {args.layers} layers, "
          f"vocab 32000; {len(jax.local_devices())} JAX device(s), {torch.get_num_threads()} torch threads; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    if rows:
        bmx_scores, hf_scores = rows.pop()
        print(f"max |bmx - HF| per-option log-likelihood: {np.abs(bmx_scores - hf_scores).max():.2e}\n")
        print("| run (one process, model loaded) | seconds | questions/s | acc |")
        print("|---|---|---|---|")
        for label, seconds, accuracy in rows:
            print(f"| {label} | {seconds:.1f} | {args.limit / seconds:.1f} | {accuracy:.4f} |")
    reference = cold[0][1]
    print(f"\nCold start, each in a fresh process ({cache_files} programs in the compilation cache):\n")
    print("| run | eval s | questions/s | vs lm-eval | whole process s | vs lm-eval | acc |")
    print("|---|---|---|---|---|---|---|")
    for label, timing in cold:
        print(f"| {label} | {timing['eval_s']:.1f} | {args.limit / timing['eval_s']:.1f} | "
              f"{reference['eval_s'] / timing['eval_s']:.2f}x | {timing['wall_s']:.1f} | "
              f"{reference['wall_s'] / timing['wall_s']:.2f}x | {timing['acc']:.4f} |")


def in_process_rows(args, hf_dir: Path, ckpt: Path, manager) -> list:
    """The warm comparison in this process; the last item is (bmx scores, HF scores) per option."""
    from lm_eval.models.huggingface import HFLM

    from bmx.eval.evaluate import EvalSettings, evaluate_task
    from bmx.eval.harness import BmxLM
    from bmx.eval.models import load_eval_model
    from bmx.tasks.catalog import load_task

    rows = []
    hf_lm = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    hf_seconds, hf_scores, hf_acc = timed_lm_eval(hf_lm, manager, args.limit)
    rows.append(("lm-eval, HF backend (PyTorch)", hf_seconds, hf_acc))

    eval_model = load_eval_model(ckpt)
    bmx_lm = BmxLM(eval_model=eval_model, tokens_per_batch=args.tokens_per_batch)
    for label in ("first run, compiling", "warm"):
        seconds, bmx_scores, bmx_acc = timed_lm_eval(bmx_lm, manager, args.limit)
        rows.append((f"lm-eval, bmx backend (JAX), {label}", seconds, bmx_acc))

    task = load_task("medqa", args.data_dir)
    settings = EvalSettings(protocol="loglik", shots=0, limit=args.limit, tokens_per_batch=args.tokens_per_batch,
                            progress=False)
    fresh = load_eval_model(ckpt)  # its own jit cache, so the first run compiles again
    for label, model in (("first run, compiling", fresh), ("warm", fresh)):
        start = time.perf_counter()
        outcome = evaluate_task([model], task, settings)
        rows.append((f"bmx.eval loglik protocol, {label}", time.perf_counter() - start, outcome.summary["acc"]))
    rows.append((bmx_scores, hf_scores))
    return rows


if __name__ == "__main__":
    main()
