"""`bmx data prepare INPUT... --out DIR`: packed token shards for pretraining;
`bmx data prepare-sft --tasks medqa,... --out DIR`: packed QA examples for fine-tuning (or `python -m bmx.data`).

Bad input, a full disk or a killed worker is one line `bmx data: error: ...` (exit 2)."""

from __future__ import annotations

import argparse
import errno
import json
import sys

from bmx import cli
from bmx.data.licenses import LICENSE_FILTERS
from bmx.data.prepare import PrepareSettings, WorkerDied, prepare
from bmx.data.prepare_sft import QUESTION_SPLITS, SFTSettings, prepare_sft
from bmx.data.sources import InputError
from bmx.tokenizer import MISTRAL_V01
from bmx.compile_cache import enable_compile_cache


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("data"), description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("prepare", help="JATS/PubMed/PubTator/text/JSONL/HF inputs -> ArrayRecord shards")
    run.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="file, directory, glob, saved HF dataset directory, or hf:NAME[:SPLIT]")
    run.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    run.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence (default 2048)")
    run.add_argument("--tokenizer", default=MISTRAL_V01,
                     help=f"'{MISTRAL_V01}' (default), a SentencePiece .model file or an HF tokenizer directory")
    run.add_argument("--licenses", choices=LICENSE_FILTERS, default="commercial",
                     help="commercial: CC0/CC BY/CC BY-SA/CC BY-ND/public domain only, as the paper (default)")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    run.add_argument("--val-fraction", type=float, default=PrepareSettings.val_fraction,
                     help=f"share of documents (by text hash) in the validation split (default {PrepareSettings.val_fraction})")
    run.add_argument("--segment-ids", action="store_true",
                     help="also store per-token document ids, for attention masking across documents")
    run.add_argument("--sequences-per-shard", type=int, default=None,
                     help="records per ArrayRecord shard (default: about 32M tokens per shard)")
    run.add_argument("--text-field", default="text", help="field holding the text in .jsonl and HF datasets")
    run.add_argument("--max-document-bytes", type=int, default=PrepareSettings.max_document_bytes,
                     help="skip (and list) documents larger than this once decompressed "
                          f"(default {PrepareSettings.max_document_bytes >> 20} MiB): bounds memory against bombs")
    run.add_argument("--allow-empty", action="store_true",
                     help="exit 0 even when every input was rejected (default: an empty dataset is an error)")
    sft = commands.add_parser("prepare-sft", help="medical QA questions -> packed prompt+answer shards for SFT")
    sft.add_argument("--tasks", default="medqa", help="comma-separated task names from bmx.tasks.catalog (default medqa)")
    sft.add_argument("--data-dir", default=None, help="evaluation data folder (default $BMX_EVAL_DATA)")
    sft.add_argument("--question-split", choices=QUESTION_SPLITS, default="train",
                     help="train (default), or test: the evaluation questions themselves (demos only)")
    sft.add_argument("--out", required=True, help="output directory")
    sft.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence (default 2048)")
    sft.add_argument("--val-fraction", type=float, default=0.05, help="share of examples held out (default 0.05)")
    sft.add_argument("--all-tokens", action="store_true", help="train on prompt tokens too, not only the answer")
    sft.add_argument("--tokenizer", default=MISTRAL_V01, help="as for prepare")
    return parser


def _prepare_sft(args) -> dict:
    from bmx.tasks.catalog import default_data_dir

    settings = SFTSettings(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                           question_split=args.question_split, seq_len=args.seq_len, val_fraction=args.val_fraction,
                           answer_only=not args.all_tokens, tokenizer=args.tokenizer)
    return prepare_sft(args.data_dir or default_data_dir(), args.out, settings)


def main(argv: list[str] | None = None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    args = _parser().parse_args(argv)
    if args.command == "prepare-sft":
        try:
            manifest = _prepare_sft(args)
        except (ValueError, OSError) as error:
            return cli.fail("data", error)
        print(json.dumps({key: manifest[key] for key in ("documents", "tokens", "sequences")}))
        return 0
    settings = PrepareSettings(
        seq_len=args.seq_len, tokenizer=args.tokenizer, licenses=args.licenses, val_fraction=args.val_fraction,
        segment_ids=args.segment_ids, sequences_per_shard=args.sequences_per_shard, text_field=args.text_field,
        max_document_bytes=args.max_document_bytes,
    )
    try:
        manifest = prepare(args.inputs, args.out, settings, workers=args.workers)
    except (InputError, OSError, ValueError, WorkerDied) as error:
        return cli.fail("data", _with_context(error, args.out))
    summary = {key: manifest[key] for key in ("documents", "tokens", "sequences", "excluded_by_license")}
    summary["skipped"] = len(manifest["skipped"])
    print(json.dumps(summary))
    if manifest["documents"] == 0 and not args.allow_empty:
        return cli.fail("data", _nothing_kept(manifest, args.out))
    return 0


def _with_context(error: Exception, out: str) -> Exception | str:
    """The error, with the context a bare OSError lacks (Python's ENOSPC names no file)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (f"no space left on device while writing {out}; free some and re-run the same command "
                "(finished work is kept and resumed)")
    return error


def _nothing_kept(manifest: dict, out: str) -> str:
    skipped, excluded = manifest["skipped"], manifest["excluded_by_license"]
    example = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
    return (f"every input was rejected: {len(skipped)} skipped{example}, {excluded} excluded by --licenses "
            f"{manifest['licenses']}; {out}/manifest.json lists them all; --allow-empty accepts an empty dataset")


if __name__ == "__main__":
    sys.exit(cli.run("data", main))
