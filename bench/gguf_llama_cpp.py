"""bmx's GGUF export next to llama.cpp's own converter and runtime (not part of CI).

    python bench/gguf_llama_cpp.py --llama-cpp LLAMA_CPP_SRC [--write-reference] [--logits]

1. Writes the tests' tiny Mistral (tests/convert/gguf_testing.py) under runs/gguf_llama_cpp/, runs
   llama.cpp's `convert_hf_to_gguf.py` from LLAMA_CPP_SRC on it for f32, f16, bf16 and q8_0 (the
   types that script writes) and `python -m bmx.convert bmx-to-gguf` for the same types, and prints
   per type how many metadata keys and tensors agree (tensors: name, shape, type and bytes).
   `--write-reference` stores the converter's summaries in tests/convert/gguf_llama_cpp_reference.json,
   which the CI test compares bmx's files against without llama.cpp installed.
2. `--logits`: loads bmx's files with llama-cpp-python and compares its logits on a prompt with
   bmx's float32 forward pass of the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tests_helper():
    """tests/convert/gguf_testing.py by path (bench/convert.py would shadow `convert` on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gguf_testing", REPO / "tests" / "convert" / "gguf_testing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helper = _tests_helper()
TINY_NAME, gguf_summary, write_tiny_mistral = _helper.TINY_NAME, _helper.gguf_summary, _helper.write_tiny_mistral

REFERENCE = REPO / "tests" / "convert" / "gguf_llama_cpp_reference.json"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
PROMPT = "Patients with type 2 diabetes were randomised to"


def compare(ours: dict, theirs: dict) -> tuple[list[str], list[str]]:
    keys = [key for key in sorted(set(ours["metadata"]) | set(theirs["metadata"]))
            if ours["metadata"].get(key) != theirs["metadata"].get(key)]
    tensors = [name for name in sorted(set(ours["tensors"]) | set(theirs["tensors"]))
               if ours["tensors"].get(name) != theirs["tensors"].get(name)]
    return keys, tensors


def converter_version(llama_cpp: Path) -> str:
    for candidate in (llama_cpp.parent.parent / "llama_cpp" / "__init__.py", llama_cpp / "gguf-py" / "pyproject.toml"):
        if candidate.is_file():
            return f"{candidate.relative_to(llama_cpp.parent.parent)}: " + next(
                line.strip() for line in candidate.read_text().splitlines() if "version" in line)
    return "unknown"


def run_converters(llama_cpp: Path, work: Path, write_reference: bool) -> dict[str, Path]:
    from bmx.convert.gguf_export import bmx_to_gguf

    model = work / TINY_NAME if (work / TINY_NAME).is_dir() else write_tiny_mistral(work)
    reference = {"llama_cpp": converter_version(llama_cpp), "types": {}}
    ours = {}
    print("| type | converter s | bmx s | metadata keys differing | tensors differing (of 21) |")
    print("|---|---:|---:|---|---:|")
    for gguf_type in CONVERTER_TYPES:
        peer_file, our_file = work / f"llama_cpp_{gguf_type}.gguf", work / f"bmx_{gguf_type}.gguf"
        for file in (peer_file, our_file):
            file.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model), "--outfile",
                        str(peer_file), "--outtype", gguf_type], check=True, capture_output=True)
        peer_seconds = time.perf_counter() - start
        start = time.perf_counter()
        bmx_to_gguf(model, our_file, gguf_type, progress=False)
        our_seconds = time.perf_counter() - start
        theirs = gguf_summary(peer_file)
        reference["types"][gguf_type] = theirs
        keys, tensors = compare(gguf_summary(our_file), theirs)
        print(f"| {gguf_type} | {peer_seconds:.1f} | {our_seconds:.1f} | {', '.join(keys) or 'none'} | {len(tensors)} |")
        ours[gguf_type] = our_file
    if write_reference:
        REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
        print(f"wrote {REFERENCE}")
    return ours


_LLAMA_CPP_SCORES = """
import json, sys
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
tokens = llm.tokenize(sys.argv[3].encode(), add_bos=True)
llm.eval(ids)
print(json.dumps({"tokens": tokens, "scores": [list(map(float, row)) for row in llm.scores[: len(ids)]]}))
"""


def llama_cpp_scores(path: Path, ids: list[int]) -> dict | str:
    """llama-cpp-python's tokens of PROMPT and logits for `ids`, run in a child process (llama.cpp's CPU
    kernels can crash the process); on a crash, what happened."""
    child = subprocess.run([sys.executable, "-c", _LLAMA_CPP_SCORES, str(path), json.dumps(ids), PROMPT],
                           capture_output=True, text=True)
    if child.returncode != 0:
        kernel = next((word for word in child.stderr.split() if word.startswith("ggml_")), "")
        signal = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
        return f"llama.cpp crashed ({signal}{', in ' + kernel if kernel else ''})"
    return json.loads(child.stdout.strip().splitlines()[-1])


def dequantized_copy(quantized: Path, f32: Path, out: Path) -> Path:
    """`f32` (bmx's float32 GGUF of the same model) with every tensor replaced by `gguf.quants.dequantize` of
    `quantized`'s: running it shows what llama.cpp computes from the quantized values in float arithmetic,
    which separates the runtime's reading of the blocks from the quantization error itself."""
    import shutil

    import gguf

    shutil.copy(f32, out)
    floats = {tensor.name: tensor for tensor in gguf.GGUFReader(out, "r+").tensors}
    for tensor in gguf.GGUFReader(quantized).tensors:
        target = floats[tensor.name]
        target.data[...] = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(target.data.shape)
        target.data.flush()
    return out


def compare_logits(model_dir: Path, work: Path) -> None:
    import numpy as np

    from bmx.checkpoints import load
    from bmx.convert import hf_to_bmx
    from bmx.convert.gguf_export import bmx_to_gguf
    from bmx.tokenizer import load_tokenizer

    ckpt = work / "bmx_ckpt"
    if not ckpt.is_dir():
        hf_to_bmx(model_dir, ckpt, progress=False)
    model, _ = load(ckpt)
    ids = load_tokenizer(model_dir / "tokenizer.model").encode(PROMPT, add_bos=True)
    ours = np.asarray(model(np.asarray([ids], np.int32)))[0]
    print(f"\nprompt: {len(ids)} tokens; bmx float32 logits std {ours.std():.4f}")
    print("| GGUF type | llama.cpp tokens = bmx's | max abs logit diff | diff / logit std | same argmax "
          "| vs its dequantized weights in f32: max diff, same argmax |")
    print("|---|---|---:|---:|---:|---|")
    for gguf_type in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        path = work / f"bmx_{gguf_type}.gguf"
        if not path.is_file():
            bmx_to_gguf(ckpt, path, gguf_type, progress=False)
        result = llama_cpp_scores(path, ids)
        if isinstance(result, str):
            own = work / f"llama_cpp_{gguf_type}.gguf"  # the same type from llama.cpp's own converter
            also = "" if not own.is_file() else (
                "; so does its own converter's file" if isinstance(llama_cpp_scores(own, ids), str)
                else "; its own converter's file runs")
            print(f"| {gguf_type} | {result}{also} | | | | |")
            continue
        theirs = np.asarray(result["scores"], np.float32)
        diff = np.abs(theirs - ours).max()
        same = (theirs.argmax(-1) == ours.argmax(-1)).mean()
        versus_dequantized = ""
        if gguf_type not in ("f32", "f16", "bf16"):
            plain = llama_cpp_scores(dequantized_copy(path, work / "bmx_f32.gguf", work / f"dequantized_{gguf_type}.gguf"), ids)
            plain = np.asarray(plain["scores"], np.float32)
            versus_dequantized = (f"{np.abs(theirs - plain).max():.2e}, "
                                  f"{(theirs.argmax(-1) == plain.argmax(-1)).mean():.0%}")
        print(f"| {gguf_type} | {result['tokens'] == ids} | {diff:.2e} | {diff / ours.std():.3f} | {same:.0%} "
              f"| {versus_dequantized} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gguf_llama_cpp")
    parser.add_argument("--write-reference", action="store_true")
    parser.add_argument("--logits", action="store_true", help="compare llama-cpp-python's logits with bmx's")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    run_converters(args.llama_cpp.resolve(), args.work, args.write_reference)
    if args.logits:
        compare_logits(args.work / TINY_NAME, args.work)


if __name__ == "__main__":
    main()
