"""`bmx eval --ckpt DIR --tasks all --protocol biomistral --out DIR`: the medical QA evaluation.

Also `python -m bmx.eval`. Bad input (a flag, a task, a missing data file or checkpoint) is one line
`bmx eval: error: ...` (exit 2)."""

from __future__ import annotations

import argparse
import sys

from bmx import cli
from bmx.compile_cache import enable_compile_cache

from bmx.eval.engine import DEFAULT_TOKENS_PER_BATCH
from bmx.eval.evaluate import PROTOCOLS, EvalSettings, evaluate_tasks, results_document
from bmx.eval.recalibration import METHODS as CALIBRATION_METHODS
from bmx.tasks.catalog import LANGUAGES, SUITES, default_data_dir, load_tasks, resolve_tasks
from bmx.tasks.prompts import CHOICE_STYLES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=cli.prog("eval"), description=__doc__)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--ckpt", help="bmx checkpoint or Hugging Face model directory")
    models.add_argument("--ensemble", nargs=2, metavar=("CKPT_A", "CKPT_B"),
                        help="the paper's ensemble: letter probabilities of two models summed")
    parser.add_argument("--tasks", default=None, help="all (default), multilingual, mmlu, or task names separated by "
                                                      "commas")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="a leaderboard's tasks and protocol (open-medical-llm: 9 tasks, zero-shot loglik acc)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default biomistral")
    parser.add_argument("--shots", type=int, default=None, help="default 3")
    parser.add_argument("--seeds", type=int, default=3, help="shot sets to average over")
    parser.add_argument("--lang", choices=LANGUAGES, default="en")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    parser.add_argument("--data-dir", default=None, help="evaluation data (default: $BMX_EVAL_DATA)")
    parser.add_argument("--source", choices=("auto", "raw", "bioinstructqa"), default="auto",
                        help="raw task files or the BioInstructQA copy (auto: raw for English when present)")
    parser.add_argument("--choices", choices=CHOICE_STYLES, default="letters",
                        help="loglik: score the option letters (lm-eval's tasks) or the option texts")
    parser.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: as stored)")
    parser.add_argument("--tokens-per-batch", type=int, default=DEFAULT_TOKENS_PER_BATCH,
                        help="padded tokens per forward pass, over all devices")
    parser.add_argument("--no-plots", action="store_true", help="skip the reliability diagrams")
    parser.add_argument("--calibrate", choices=CALIBRATION_METHODS, default=None,
                        help="fit temperature (or vector) scaling on questions disjoint from those scored")
    parser.add_argument("--calibration-folds", type=int, default=5,
                        help="cross-fitting folds for tasks without a calibration split (MMLU has val)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR|off",
                        help="JAX's persistent compilation cache (default: $BMX_COMPILE_CACHE or ~/.cache/bmx/jax)")
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        enable_compile_cache(args.compile_cache)
        return run(args)
    except (ValueError, OSError) as error:  # bad input: one line naming what is wrong
        return cli.fail("eval", error)


def run(args: argparse.Namespace) -> int:
    from bmx.eval.models import load_eval_model
    from bmx.eval.report import markdown_table, write_outputs

    task_spec, protocol, shots = resolve_suite(args)
    settings = EvalSettings(protocol=protocol, shots=shots, seeds=args.seeds, limit=args.limit,
                            choice_style=args.choices, tokens_per_batch=args.tokens_per_batch,
                            calibrate=args.calibrate, calibration_folds=args.calibration_folds, suite=args.suite)
    if args.ensemble and protocol != "biomistral":
        raise ValueError("--ensemble sums letter probabilities: it needs --protocol biomistral")
    tasks = load_tasks(resolve_tasks(task_spec, args.lang), args.data_dir or default_data_dir(), args.source)
    checkpoints = args.ensemble or [args.ckpt]
    models = [load_eval_model(ckpt, tokenizer=args.tokenizer, dtype=args.dtype) for ckpt in checkpoints]
    outcomes = evaluate_tasks(models, tasks, settings)
    document = results_document(outcomes, settings, [m.name for m in models])
    out_dir = write_outputs(args.out, document, outcomes, plots=not args.no_plots)
    print(markdown_table(document, " + ".join(document["models"])))
    print(f"written to {out_dir}")
    return 0


def resolve_suite(args: argparse.Namespace) -> tuple[str, str, int]:
    """`(tasks, protocol, shots)`: the suite's, or the flags' (with their defaults)."""
    if args.suite is None:
        return args.tasks or "all", args.protocol or "biomistral", 3 if args.shots is None else args.shots
    suite = SUITES[args.suite]
    for flag, given, fixed in (("--tasks", args.tasks, None), ("--protocol", args.protocol, suite.protocol),
                               ("--shots", args.shots, suite.shots), ("--choices", args.choices, "letters"),
                               ("--lang", args.lang, "en")):
        if given is not None and given != fixed:
            raise ValueError(f"--suite {args.suite} fixes {flag} ({fixed if fixed is not None else 'its 9 tasks'}); "
                             f"drop {flag} {given}")
    return ",".join(suite.tasks), suite.protocol, suite.shots


if __name__ == "__main__":
    sys.exit(cli.run("eval", main))
