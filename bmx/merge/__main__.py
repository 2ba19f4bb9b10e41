"""`python -m bmx.merge CONFIG.yaml OUT_DIR [--device cpu|gpu|tpu] [--out-shard-size 5GB] [--seed N] [--to-bmx]`
and `python -m bmx.merge extract-lora BASE FINETUNED OUT_DIR --rank R [--no-distribute-scale] [--sv-epsilon E]`
(or `bmx merge ...`). A bad config or incompatible models are one line `bmx merge: error: ...` naming the
key or tensor (exit 2)."""

from __future__ import annotations

import argparse
import logging
import sys

from bmx import cli

EXTRACT_LORA = "extract-lora"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=cli.prog("merge"), description="Merge models from a mergekit YAML config.",
                                     epilog=f"`{cli.prog('merge')} {EXTRACT_LORA} --help`: a LoRA adapter from a fine-tune.")
    parser.add_argument("config", help="mergekit YAML config (model paths are resolved relative to it first)")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty)")
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu", help="JAX device that does the math")
    parser.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MiB")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's/DELLA's drop masks (same seed, same merge)")
    parser.add_argument("--to-bmx", action="store_true", help="write a bmx checkpoint instead of an HF directory")
    parser.add_argument("--quiet", action="store_true", help="log only warnings (no per-tensor SLERP lines)")
    return parser.parse_args(argv)


def parse_extract_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"{cli.prog('merge')} {EXTRACT_LORA}",
                                     description="A PEFT LoRA adapter from the truncated SVD of FINETUNED - BASE (mergekit-extract-lora).")
    parser.add_argument("base", help="base model (HF directory or bmx checkpoint)")
    parser.add_argument("finetuned", help="fine-tuned model of the same architecture")
    parser.add_argument("out_dir", help="adapter directory to write (must not exist or be empty)")
    parser.add_argument("--rank", type=int, required=True, help="largest rank kept per projection (mergekit's --max-rank)")
    parser.add_argument("--no-distribute-scale", dest="distribute_scale", action="store_false",
                        help="lora_A = S V^T, lora_B = U (default: sqrt(S) on each side)")
    parser.add_argument("--sv-epsilon", type=float, default=0.0, help="also drop singular values <= this")
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default="cpu", help="JAX device that does the SVDs")
    parser.add_argument("--quiet", action="store_true", help="log only warnings")
    return parser.parse_args(argv)


def _run(argv: list[str] | None):
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] == EXTRACT_LORA:
        from bmx.merge.extract_lora import extract_lora

        args = parse_extract_args(arguments[1:])
        return args, lambda: extract_lora(args.base, args.finetuned, args.out_dir, args.rank, distribute_scale=args.distribute_scale,
                                          sv_epsilon=args.sv_epsilon, device=args.device)
    from bmx.merge.run import run_merge, run_merge_to_bmx

    args = parse_args(arguments)
    merge = run_merge_to_bmx if args.to_bmx else run_merge
    return args, lambda: merge(args.config, args.out_dir, device=args.device, out_shard_size=args.out_shard_size, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args, work = _run(argv)
    if cli.is_program("merge", argv):  # a caller passing argv (tests, notebooks) keeps its own logging setup
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        work()
    except (ValueError, OSError) as error:  # a MergeConfigError naming the key, IncompatibleModelsError the tensor
        return cli.fail("merge", error)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("merge", main))
