"""`python -m bmx.quant --ckpt DIR --method int8|nf4|fp4|awq|rtn --out DIR [--export-hf [DIR]]`.

Also `python -m bmx.quant --import-hf HF_DIR --out DIR` (AutoAWQ GEMM or transformers'
bitsandbytes 4-bit directory → quantized bmx checkpoint) and
`python -m bmx.quant --ckpt QUANTIZED_DIR --export-hf DIR [--format compressed-tensors]` (re-export a
quantized checkpoint). All of them also as `bmx quant ...`; bad input or a full disk is one line
`bmx quant: error: ...` (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bmx import cli
from bmx.quant.schemes import METHODS
from bmx.compile_cache import enable_compile_cache

EXPORT_DIR_NAME = "hf_quantized"  # default place of --export-hf inside --out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=cli.prog("quant"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="float bmx checkpoint or Hugging Face directory (or a quantized checkpoint "
                                       "to re-export)")
    source.add_argument("--import-hf", help="AutoAWQ GEMM or transformers bitsandbytes 4-bit directory to import")
    parser.add_argument("--method", choices=METHODS, help="rtn: AWQ's 4-bit format without the search")
    parser.add_argument("--group-size", type=int, default=128, help="awq/rtn: inputs per scale and zero")
    parser.add_argument("--blocksize", type=int, default=64, help="nf4/fp4: values per absmax")
    parser.add_argument("--double-quant", action="store_true", help="nf4/fp4: 8-bit absmax (blocks of 256)")
    parser.add_argument("--calib", help="prepared dataset (python -m bmx.data prepare) for awq and int8 outliers")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--duo-scaling", action="store_true",
                        help="awq: AutoAWQ's scale formula x̄^α / w̄^(1-α) instead of the paper's x̄^α")
    parser.add_argument("--outlier-threshold", type=float, default=None,
                        help="int8: activation magnitude of an outlier feature (6.0 when --calib is given)")
    parser.add_argument("--out", help="output bmx checkpoint")
    parser.add_argument("--export-hf", nargs="?", const="", default=None, metavar="DIR",
                        help=f"also write the Hugging Face layout (default DIR: OUT/{EXPORT_DIR_NAME})")
    parser.add_argument("--format", dest="export_format", choices=("transformers", "compressed-tensors"),
                        default="transformers",
                        help="layout of --export-hf: transformers = AutoAWQ's GEMM (awq, rtn) or bitsandbytes' "
                             "(nf4, fp4); compressed-tensors = llm-compressor's pack-quantized, for vLLM "
                             "(awq, rtn → W4A16 asymmetric per group; int8 without outliers → W8A16 per channel)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as error:  # bad input or a full disk: one line, no traceback
        return cli.fail("quant", error)


def run(args: argparse.Namespace) -> int:
    from bmx.quant.checkpoint import quantization_metadata, save_quantized
    from bmx.quant.hf_export import export_hf, import_hf

    progress = not args.no_progress
    if args.import_hf:
        if not args.out:
            raise ValueError("--import-hf needs --out DIR")
        save_quantized(import_hf(args.import_hf), args.out)
        print(f"imported {args.import_hf} → {args.out}")
        return 0
    if quantization_metadata(args.ckpt) is not None:  # re-export an already quantized checkpoint
        if not args.export_hf:
            raise ValueError(f"{args.ckpt} is already quantized: give --export-hf DIR to write its HF layout")
        from bmx.checkpoints import load

        export_hf(load(args.ckpt)[0], args.export_hf, source=args.ckpt, progress=progress,
                  export_format=args.export_format)
        print(f"exported {args.ckpt} → {args.export_hf}")
        return 0
    if not args.method or not args.out:
        raise ValueError("quantizing needs --method and --out")
    from bmx.quant.pipeline import quantize_checkpoint

    export_dir = None
    if args.export_hf is not None:
        export_dir = args.export_hf or str(Path(args.out) / EXPORT_DIR_NAME)
    quantize_checkpoint(args.ckpt, args.out, args.method, group_size=args.group_size, blocksize=args.blocksize,
                        double_quant=args.double_quant, calib=args.calib, calib_samples=args.calib_samples,
                        calib_seq_len=args.calib_seq_len, outlier_threshold=args.outlier_threshold,
                        duo_scaling=args.duo_scaling, export_hf=export_dir, progress=progress,
                        export_format=args.export_format)
    print(f"quantized {args.ckpt} with {args.method} → {args.out}" + (f" (HF layout: {export_dir})" if export_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("quant", main))
