"""python -m bmx.convert {hf-to-bmx,bmx-to-hf} SRC DST [--dtype ...] [--max-shard-size 5GB]
python -m bmx.convert merge-lora BASE ADAPTER DST [--dtype ...] [--max-shard-size 5GB]"""

import argparse
import sys

from bmx.convert.hf import bmx_to_hf, hf_to_bmx
from bmx.convert.safetensors_io import CheckpointFormatError

DTYPES = ("float32", "bfloat16", "float16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmx.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    to_bmx = commands.add_parser("hf-to-bmx", help="Hugging Face safetensors directory → bmx checkpoint")
    to_bmx.add_argument("src")
    to_bmx.add_argument("dst")
    to_bmx.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: as stored)")
    to_hf = commands.add_parser("bmx-to-hf", help="bmx checkpoint → Hugging Face safetensors directory")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: as stored)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    # merge-lora: the work is in bmx.lora.merge_to_hf.
    merge = commands.add_parser("merge-lora", help="fold a PEFT LoRA adapter into its base → Hugging Face directory")
    merge.add_argument("base", help="the base model: bmx checkpoint or Hugging Face directory")
    merge.add_argument("adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("dst")
    merge.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: as the base stores it)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge-lora":
            from bmx.lora.merge_to_hf import merge_lora_to_hf

            out = merge_lora_to_hf(args.base, args.adapter, args.dst, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size)
        elif args.command == "hf-to-bmx":
            out = hf_to_bmx(args.src, args.dst, dtype=args.dtype)
        else:
            out = bmx_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (CheckpointFormatError, OSError, ValueError) as error:  # bad input, a full disk: one line, no output
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # SIGINT, or SIGTERM (see atomic_output_dir)
        print(f"interrupted ({interrupt or 'SIGINT'}): no output written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
