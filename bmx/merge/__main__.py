"""`python -m bmx.merge CONFIG.yaml OUT_DIR [--device cpu|gpu|tpu] [--out-shard-size 5GB] [--seed N] [--to-bmx]`."""

from __future__ import annotations

import argparse
import logging
import sys

from bmx.merge.config import MergeConfigError
from bmx.merge.models import IncompatibleModelsError
from bmx.merge.run import run_merge, run_merge_to_bmx
from bmx.compile_cache import enable_compile_cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bmx.merge", description="Merge models from a mergekit YAML config.")
    parser.add_argument("config", help="mergekit YAML config (model paths are resolved relative to it first)")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty)")
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu", help="JAX device that does the math")
    parser.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MiB")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's drop masks (same seed, same merge)")
    parser.add_argument("--to-bmx", action="store_true", help="write a bmx checkpoint instead of an HF directory")
    parser.add_argument("--quiet", action="store_true", help="log only warnings (no per-tensor SLERP lines)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    args = parse_args(argv)
    if argv is None:  # the command line; a caller passing argv (tests, notebooks) keeps its own logging setup
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", force=True)
    merge = run_merge_to_bmx if args.to_bmx else run_merge
    try:
        merge(args.config, args.out_dir, device=args.device, out_shard_size=args.out_shard_size, seed=args.seed)
    except (MergeConfigError, IncompatibleModelsError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
