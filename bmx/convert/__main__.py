"""python -m bmx.convert {hf-to-bmx,bmx-to-hf} SRC DST [--dtype ...] [--max-shard-size 5GB]
python -m bmx.convert merge-lora BASE ADAPTER DST [--dtype ...] [--max-shard-size 5GB]
python -m bmx.convert calibrate CKPT DST (--temperature T | --from-eval RESULTS.json)
python -m bmx.convert bmx-to-gguf CKPT OUT.gguf [--type f16|bf16|f32|q8_0|q5_1|q5_0|q4_1|q4_0]
(or `bmx convert ...`). Bad input or a full disk is one line `bmx convert: error: ...` (exit 2) and no output;
SIGINT and SIGTERM remove the partial output and exit 130."""

import argparse
import sys

from bmx import cli
from bmx.convert.hf import bmx_to_hf, hf_to_bmx
from bmx.convert.safetensors_io import CheckpointFormatError
from bmx.compile_cache import enable_compile_cache

DTYPES = ("float32", "bfloat16", "float16")


def main(argv=None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    parser = argparse.ArgumentParser(prog=cli.prog("convert"), description=__doc__)
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
    # calibrate: the work is in bmx.convert.calibrate.
    calibrate = commands.add_parser("calibrate", help="divide the LM head by a temperature → Hugging Face directory")
    calibrate.add_argument("src", help="bmx checkpoint or Hugging Face directory")
    calibrate.add_argument("dst")
    fitted = calibrate.add_mutually_exclusive_group(required=True)
    fitted.add_argument("--temperature", type=float, help="the softmax temperature T (logits become z / T)")
    fitted.add_argument("--from-eval", metavar="RESULTS.json", help="T from a python -m bmx.eval --calibrate "
                                                                     "temperature run")
    calibrate.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    # bmx-to-gguf: the work is in bmx.convert.gguf_export.
    to_gguf = commands.add_parser(
        "bmx-to-gguf", help="float bmx checkpoint or HF directory → GGUF file (llama.cpp, Ollama, LM Studio)",
        description="Writes what llama.cpp's convert_hf_to_gguf.py writes for Mistral (architecture llama). Types: "
                    "those gguf-py quantizes itself (k-quants such as q4_k_m it can only read: quantize an f16 file "
                    "with llama.cpp's llama-quantize for those). Quantized checkpoints (AWQ, NF4, int8) are refused: "
                    "export the float checkpoint they were made from. Needs the gguf package.")
    to_gguf.add_argument("src", help="float bmx checkpoint or Hugging Face Mistral directory")
    to_gguf.add_argument("dst", help="the .gguf file to write (must not exist)")
    to_gguf.add_argument("--type", default="f16", help="type of the 2-D weights, one of f16, bf16, f32, q8_0, "
                                                        "q5_1, q5_0, q4_1, q4_0 (norms stay f32); default f16")
    args = parser.parse_args(argv)
    try:
        if args.command == "bmx-to-gguf":
            from bmx.convert.gguf_export import bmx_to_gguf

            out = bmx_to_gguf(args.src, args.dst, args.type)
        elif args.command == "calibrate":
            from bmx.convert.calibrate import calibrate_checkpoint, temperature_from_eval

            temperature = args.temperature if args.from_eval is None else temperature_from_eval(args.from_eval)
            out = calibrate_checkpoint(args.src, args.dst, temperature, source=args.from_eval,
                                       max_shard_size=args.max_shard_size)
        elif args.command == "merge-lora":
            from bmx.lora.merge_to_hf import merge_lora_to_hf

            out = merge_lora_to_hf(args.base, args.adapter, args.dst, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size)
        elif args.command == "hf-to-bmx":
            out = hf_to_bmx(args.src, args.dst, dtype=args.dtype)
        else:
            out = bmx_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (CheckpointFormatError, OSError, ValueError) as error:  # bad input, a full disk: one line, no output
        return cli.fail("convert", error)
    except KeyboardInterrupt as interrupt:  # SIGINT, or SIGTERM (see atomic_output_dir)
        print(f"bmx convert: interrupted ({interrupt or 'SIGINT'}): no output written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("convert", main))
