"""Benchmark: prefill and decode tokens/s of bmx's generation vs transformers' `generate`, same model and prompts.

    python bench/generate.py [--batch 8] [--new-tokens 128] [--repeats 2] [--layers 8] [--hidden 512] [--torch-threads N]
                             [--dtype float32|bfloat16]

One random Mistral-shaped model (float32 or bfloat16 weights and compute, vocab 32000, GQA 4:1, sliding window 256 so long prompts
plus generation run past it) is created by transformers, converted to bmx, and both generate greedily
from the same left-padded random prompts (64-320 tokens) in the same process, one after the other.
Prefill is timed as the prompt forward alone (bmx: the jitted prefill, after a compile run;
transformers: `model(...)` with a cache); decode is each whole generation's time minus the best
prefill, over batch × (new tokens − 1) tokens. Best of `--repeats`, and each run's decode rate
(the spread shows how steady it is). Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def build_models(directory: Path, args):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from bmx.convert import hf_to_bmx
    from bmx.model import load

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                           num_key_value_heads=max(args.hidden // 256, 1), sliding_window=256,
                           max_position_embeddings=4096)
    reference = MistralForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    reference.save_pretrained(directory / "hf")
    hf_to_bmx(directory / "hf", directory / "bmx", progress=False)
    model, _ = load(directory / "bmx")
    return reference, model


def timed(repeats: int, run) -> list[float]:
    """Seconds of each of `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def bench_bmx(model, prompts, new_tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    import jax
    from flax import nnx

    from bmx.generate import GREEDY, generate_token_ids
    from bmx.generate.loop import compiled_steps, left_pad
    from bmx.model import unstack_layers
    from bmx.model.kv_cache import cache_slots

    model = unstack_layers(model)  # the decoding layout, as `python -m bmx.generate` uses
    input_ids, attention_mask = left_pad(prompts, pad_id=0, bucket=16)
    graphdef, state = nnx.split(model)
    prefill_step, _ = compiled_steps(graphdef, GREEDY)
    slots = cache_slots(model.config.sliding_window, input_ids.shape[1] + new_tokens)

    def prefill():
        jax.block_until_ready(prefill_step(state, input_ids, attention_mask, jax.random.key(0), slots=slots))

    def generate():
        generate_token_ids(model, prompts, max_new_tokens=new_tokens)

    prefill(), generate()  # compile
    return timed(repeats, prefill), timed(repeats, generate)


def bench_transformers(reference, prompts, new_tokens: int, repeats: int) -> tuple[float, float]:
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    @torch.inference_mode()
    def prefill():
        reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)

    @torch.inference_mode()
    def generate():
        reference.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                           eos_token_id=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    prefill(), generate()  # warm-up
    return timed(repeats, prefill), timed(repeats, generate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's own choice")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute of both (bmx computes a 16-bit model in its dtype on CPU)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, int(length)).tolist() for length in np.linspace(64, 320, args.batch)]
    prompt_tokens = sum(len(p) for p in prompts)
    decode_tokens = args.batch * (args.new_tokens - 1)
    with tempfile.TemporaryDirectory() as scratch:
        reference, model = build_models(Path(scratch), args)
        results = {}
        for name, bench, subject in (("bmx", bench_bmx, model), ("transformers", bench_transformers, reference)):
            prefill_times, total_times = bench(subject, prompts, args.new_tokens, args.repeats)
            prefill_s = min(prefill_times)
            # Decode time of each generation run: its whole time less the (best) prefill.
            decode_rates = [decode_tokens / (total - prefill_s) for total in total_times]
            results[name] = {"prefill_tokens_per_s": prompt_tokens / prefill_s,
                             "decode_tokens_per_s": max(decode_rates), "decode_tokens_per_s_each": decode_rates,
                             "prefill_s": prefill_s, "generate_s": min(total_times)}
    import jax
    import torch

    print(f"{args.layers} layers, hidden {args.hidden}, batch {args.batch}, "
          f"prompts {len(prompts[0])}-{len(prompts[-1])} "
          f"tokens, {args.new_tokens} new tokens, {args.dtype}; jax on {jax.devices()[0].platform}, "
          f"torch {torch.get_num_threads()} threads\n")
    print("| implementation | prefill tokens/s | decode tokens/s (best) | each run | generate (s) |")
    print("|---|---:|---:|---|---:|")
    for name, row in results.items():
        each = ", ".join(f"{rate:,.0f}" for rate in row["decode_tokens_per_s_each"])
        print(f"| {name} | {row['prefill_tokens_per_s']:,.0f} | {row['decode_tokens_per_s']:,.1f} | {each} "
              f"| {row['generate_s']:.2f} |")
    ratio = results["bmx"]["decode_tokens_per_s"] / results["transformers"]["decode_tokens_per_s"]
    print(f"\nbmx / transformers: decode {ratio:.2f}x, prefill "
          f"{results['bmx']['prefill_tokens_per_s'] / results['transformers']['prefill_tokens_per_s']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
