"""bmx generate --ckpt DIR (--prompt TEXT | --prompts FILE.jsonl) [--max-new-tokens N] [--greedy]
                    [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR] [--adapter PEFT_DIR]
                    [--truncate-prompt] [--output FILE.jsonl]   (or python -m bmx.generate)

Streams each generation to the console in prompt order (the first prompt of a batch live, the
others as soon as the ones before them are done). `--prompts` reads JSON lines `{"prompt": ...}`;
`--output` writes one `{"prompt", "token_ids", "text"}` line per prompt, `token_ids` being the
generated ids only. A prompt whose tokens plus `--max-new-tokens` exceed the model's
`max_position_embeddings` is an error (exit 2), or with `--truncate-prompt` loses its first tokens
(with a warning). Bad input (a missing or damaged checkpoint, a bad prompts file, an unwritable
`--output`) exits with code 2 and one line `bmx generate: error: ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from bmx import cli
from bmx.generate.sampling import Sampling
from bmx.compile_cache import enable_compile_cache


def read_prompts_file(path: str | Path) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{line_number}: expected an object with a string "prompt", '
                                 f"got {line.strip()[:80]!r}")
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


class OrderedConsole:
    """Prints streamed text in prompt order: the current prompt live, later ones buffered until their turn."""

    def __init__(self, prompts: list[str], out=None):
        self.prompts, self.out = prompts, out or sys.stdout
        self.buffers = [""] * len(prompts)
        self.finished = [False] * len(prompts)
        self.current = 0
        self._header(0)

    def _header(self, index: int) -> None:
        if index < len(self.prompts):
            self.out.write(f"=== [{index}] {self.prompts[index]}\n")
            self.out.flush()

    def __call__(self, index: int, delta: str, finished: bool) -> None:
        self.buffers[index] += delta
        self.finished[index] = self.finished[index] or finished
        while self.current < len(self.prompts):
            self.out.write(self.buffers[self.current])
            self.buffers[self.current] = ""
            if not self.finished[self.current]:
                break
            self.current += 1
            self.out.write("\n\n")
            self._header(self.current)
        self.out.flush()


def main(argv=None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    parser = argparse.ArgumentParser(prog=cli.prog("generate"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="a bmx, quantized or Hugging Face model directory (local or gs://)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help='JSON lines file of {"prompt": ...}')
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 disables top-p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer/, else Mistral v0.1")
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply to the model")
    parser.add_argument("--truncate-prompt", action="store_true",
                        help="keep the last tokens of a prompt too long for max_position_embeddings with "
                             "--max-new-tokens (default: refuse it)")
    parser.add_argument("--output", help="write one JSON line per prompt here")
    parser.add_argument("--quiet", action="store_true", help="do not stream to the console")
    args = parser.parse_args(argv)
    try:
        sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts)
        results = _run(args, prompts, sampling)
        if args.output:
            _write_results(args.output, results)
    except (ValueError, OSError) as error:
        return cli.fail("generate", error)
    return 0


def _write_results(path: str, results) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps({"prompt": result.prompt, "token_ids": result.token_ids,
                                     "text": result.text}, ensure_ascii=False) + "\n")
    print(f"wrote {len(results)} generations to {path}", file=sys.stderr)


def _run(args, prompts: list[str], sampling: Sampling):
    from bmx.checkpoints import find_tokenizer, load
    from bmx.generate.text import generate
    from bmx.model import unstack_layers
    from bmx.tokenizer import load_tokenizer

    if args.adapter:  # adapters attach to the stacked layers, then the whole goes to the decoding layout
        from bmx.lora import load_peft_adapter

        model = unstack_layers(load_peft_adapter(load(args.ckpt)[0], args.adapter), consume=True)
    else:
        model, _ = load(args.ckpt, decoding_layout=True)
    tokenizer = load_tokenizer(args.tokenizer or find_tokenizer(args.ckpt))
    console = None if args.quiet else OrderedConsole(prompts)
    with warnings.catch_warnings():  # a truncated prompt's warning as one console line, when it happens
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        return generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        stop=args.stop, seed=args.seed, batch_size=args.batch_size, on_text=console,
                        truncate_prompts=args.truncate_prompt)


if __name__ == "__main__":
    sys.exit(cli.run("generate", main))
