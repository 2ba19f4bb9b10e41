"""Benchmark: training throughput of bmx vs transformers (PyTorch, AdamW) on the same Mistral shape and batch.

    python bench/train_throughput.py [--steps 5] [--warmup 2] [--batch 4] [--seq 512] [--rounds 1] [--system-malloc]

Default shape ≈ 125M parameters (hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32000),
float32, batch 4 × 512. Each side runs in its own process (so peak RSS is its own) on random tokens,
both with the malloc settings `python -m bmx.train` gives itself (freed host memory stays mapped;
transformers gains from them too), or both with glibc's defaults (`--system-malloc`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bmx.train.host_memory import retained_memory_environment

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, sliding_window=4096, max_position_embeddings=4096)

BMX = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from bmx.model import Mistral, MistralConfig
from bmx.train.flops import peak_flops_per_device, training_flops_per_token
from bmx.train.optimizer import OptimizerConfig, make_optimizer
from bmx.train.step import make_loss_fn, make_train_step
from bmx.train.mesh import make_mesh, MeshConfig, DEFAULT_RULES
shape, steps, warmup, batch, seq = json.loads(sys.argv[1]), *map(int, sys.argv[2:6])
config = MistralConfig(**shape)
model = Mistral(config, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(model)
params = state.to_pure_dict()
optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4), optax.constant_schedule(1e-4))
opt_state = optimizer.init(params)
mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
loss = make_loss_fn(graphdef, vocab_chunk=0, z_loss_weight=0.0, document_masking=False)  # the trainer's auto choice here
step = jax.jit(make_train_step(loss, optimizer, 1, mesh, DEFAULT_RULES), donate_argnums=(0, 1))
tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
peak, _ = peak_flops_per_device()  # before the steps, on an idle process (after them it read ~45% low)
for _ in range(warmup):
    params, opt_state, metrics = step(params, opt_state, data, {})
jax.block_until_ready(metrics)
start = time.perf_counter()
for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, data, {})
jax.block_until_ready(metrics)
seconds = (time.perf_counter() - start) / steps
tps = batch * seq / seconds
print(json.dumps({"step_time": seconds, "tokens_per_second": tps, "mfu": tps * training_flops_per_token(config, seq) / peak,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_flops": peak}))
"""

TORCH = r"""
import json, resource, sys, time
import torch
from transformers import MistralConfig, MistralForCausalLM
shape, steps, warmup, batch, seq = json.loads(sys.argv[1]), *map(int, sys.argv[2:6])
torch.manual_seed(0)
model = MistralForCausalLM(MistralConfig(**shape, attn_implementation="sdpa")).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
tokens = torch.randint(0, shape["vocab_size"], (batch, seq))
def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(warmup):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
seconds = (time.perf_counter() - start) / steps
print(json.dumps({"step_time": seconds, "tokens_per_second": batch * seq / seconds,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(code: str, args: list[str], environment: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the two sides this many times and report each side's median run "
                             "(a shared machine's speed drifts between runs)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="run both sides with glibc's default malloc instead of the retained host memory "
                             "`python -m bmx.train` sets up (bmx/train/host_memory.py)")
    args = parser.parse_args()
    environment = dict(os.environ, BMX_HOST_MALLOC="system") if args.system_malloc else \
        retained_memory_environment(dict(os.environ))
    common = [json.dumps(SHAPE), str(args.steps), str(args.warmup), str(args.batch), str(args.seq)]
    rounds = [(run(BMX, common, environment), run(TORCH, common, environment)) for _ in range(args.rounds)]
    for index, (bmx, torch) in enumerate(rounds if args.rounds > 1 else []):
        print(f"round {index + 1}: bmx {bmx['tokens_per_second']:.0f} tokens/s, "
              f"transformers {torch['tokens_per_second']:.0f} tokens/s")
    bmx, torch = (sorted(side, key=lambda r: r["tokens_per_second"])[(len(side) - 1) // 2] for side in zip(*rounds))
    malloc = "glibc defaults" if args.system_malloc else "freed memory retained (both sides)"
    print(f"\nMistral ~125M (hidden 768, 12 layers, 12/4 heads, MLP 2048, vocab 32000), float32, "
          f"batch {args.batch} × {args.seq}, {args.steps} timed steps, malloc: {malloc}\n")
    print("| | tokens/s | step time (s) | MFU | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|")
    for name, result in (("bmx (JAX)", bmx), ("transformers (PyTorch, AdamW)", torch)):
        mfu = f"{result['mfu']:.1%}" if "mfu" in result else "–"
        print(f"| {name} | {result['tokens_per_second']:.0f} | {result['step_time']:.2f} | {mfu} "
              f"| {result['peak_rss_bytes'] / 1e9:.2f} |")
    print(f"\nbmx / transformers throughput: {bmx['tokens_per_second'] / torch['tokens_per_second']:.2f}×"
          f" (MFU against a measured matmul peak of {bmx['peak_flops'] / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
