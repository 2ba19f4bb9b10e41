"""Benchmark: HF ⇄ bmx conversion of a generated ~1B-parameter Mistral, next to merely reading it.

    python bench/convert.py [--dtype bfloat16] [--layers 16] [--workdir /tmp/bmx-bench-convert]

Each step runs in its own process so its peak RSS is its own. Prints a table of wall time,
throughput (GB of tensor data per second) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import json, resource, sys, time
step, src, dst = sys.argv[1:4]
start = time.perf_counter()
if step == "read":
    import numpy as np
    from bmx.convert.safetensors_io import SafetensorsReader
    reader = SafetensorsReader(src)
    for name in reader.names():
        np.array(reader.read(name))  # a copy, so every byte is read from disk
elif step == "hf-to-bmx":
    from bmx.convert import hf_to_bmx
    hf_to_bmx(src, dst, progress=False)
else:
    from bmx.convert import bmx_to_hf
    bmx_to_hf(src, dst, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def generate_checkpoint(directory: Path, layers: int, dtype: str) -> int:
    """A random Mistral checkpoint (vocab 32000, hidden 2048, 16 heads / 8 KV, MLP 7168) written tensor by tensor."""
    import ml_dtypes
    import numpy as np

    from bmx.convert.mistral_table import hf_tensor_order
    from bmx.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, parse_size
    from bmx.model import MistralConfig

    config = MistralConfig(vocab_size=32000, hidden_size=2048, intermediate_size=7168, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=8)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    order = hf_tensor_order(config)
    specs = [TensorSpec(name, row.hf_shape, np_dtype) for name, row, _ in order]
    directory.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(directory, specs, parse_size("2GB"))
    rng = np.random.default_rng(0)
    for spec in specs:
        writer.write(spec.name, (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(np_dtype))
    writer.finish()
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    return sum(spec.nbytes for spec in specs)


def run_step(step: str, src: Path, dst: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", STEP, step, str(src), str(dst)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=int, default=16, help="16 layers ≈ 1.04B parameters")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bmx-bench-convert-"))
    try:
        total_bytes = generate_checkpoint(workdir / "hf", args.layers, args.dtype)
        parameters = total_bytes // (2 if args.dtype == "bfloat16" else 4)
        rows = [("read safetensors (baseline)", run_step("read", workdir / "hf", workdir / "unused")),
                ("hf-to-bmx", run_step("hf-to-bmx", workdir / "hf", workdir / "bmx")),
                ("bmx-to-hf", run_step("bmx-to-hf", workdir / "bmx", workdir / "back"))]
        print(f"\n{parameters / 1e9:.2f}B parameters, {args.dtype}, {total_bytes / 1e9:.2f} GB of tensors\n")
        print("| step | wall time (s) | GB/s | peak RSS (GB) |")
        print("|---|---:|---:|---:|")
        for name, result in rows:
            print(f"| {name} | {result['seconds']:.1f} | {total_bytes / 1e9 / result['seconds']:.2f} "
                  f"| {result['peak_rss_bytes'] / 1e9:.2f} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
