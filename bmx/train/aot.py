"""python -m bmx.train.aot --config FILE --topology v5p:4x4x4 [--search] [key.sub=value ...]

Compiles the run's train step for a TPU slice this machine does not have (libtpu's compile-only
devices: `pip install "jax[tpu]"`), from abstract shapes only, and prints per-device HBM, FLOPs,
compute/HBM/ICI/DCN time and the predicted MFU (a range and its point estimate). Exits 1, naming the
largest buffers, when it does not fit (a verdict, not an error); a bad config or topology is one line
`bmx aot: error: ...` (exit 2).
`--search` tries a grid of mesh splits, remat policies and per-device batches instead and prints the
fitting ones by predicted MFU. The work is in `bmx.train.aot_compile` and `bmx.train.aot_search`.
"""

from __future__ import annotations

import argparse
import json
import sys

from bmx import cli


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(","))


def _words(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=cli.prog("aot"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8, v4:4x4x4")
    parser.add_argument("--slices", type=int, default=1,
                        help="that many slices joined by DCN (mesh.dcn_data: data parallel across them)")
    parser.add_argument("--no-cost", action="store_true", help="memory only: skip the FLOPs/roofline compiles")
    parser.add_argument("--json", default=None, help="also write the report(s) as JSON to this file")
    parser.add_argument("--judge-as", default=None, metavar="CHIP",
                        help="judge memory and roofline against another chip (h100: the TPU compile stands in "
                             "for a GPU one, which jax cannot do without a GPU)")
    search = parser.add_argument_group("search (--search)")
    search.add_argument("--search", action="store_true", help="try a grid of settings and rank the fitting ones")
    search.add_argument("--data", type=_ints, default=(1,), help="mesh.data values (default 1)")
    search.add_argument("--tensor", type=_ints, default=(1, 2, 4), help="mesh.tensor values (default 1,2,4)")
    search.add_argument("--remat", type=_words, default=("full", "dots_no_batch"), help="remat policies")
    search.add_argument("--per-device-batch", type=_ints, default=(1, 2, 4, 8, 16, 32),
                        help="sequences per device per microbatch (accumulation follows from the global batch)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.seq_len=2048")
    args = parser.parse_args(argv)

    from bmx.config_io import load_config
    from bmx.train.aot_hardware import CHIPS, parse_topology
    from bmx.train.config import RunConfig

    from bmx.train.aot_compile import aot_run_config, compile_report

    try:
        config = aot_run_config(load_config(RunConfig, args.config, args.overrides))
        topology = parse_topology(args.topology, args.slices)
        if args.judge_as is not None and args.judge_as not in CHIPS:
            raise ValueError(f"--judge-as {args.judge_as!r}: known chips are {sorted(CHIPS)}")
    except (ValueError, OSError) as error:  # a ConfigError naming the key, a missing config file
        return cli.fail("aot", error)

    from bmx.train.aot_format import format_report, not_fitting_message, report_dict

    if args.search:
        from bmx.train.aot_search import SearchGrid, format_table, search

        grid = SearchGrid(data=args.data, tensor=args.tensor, remat=args.remat, per_device_batch=args.per_device_batch)

        def progress(candidate, report):
            verdict = f"fits, predicted MFU {report.predicted_mfu:.1%}" if report.predicted_mfu else (
                "fits" if report.fits else "does not fit")
            print(f"tried {candidate}: {verdict} ({report.compile_seconds:.0f} s)", flush=True)

        reports = search(config, topology, grid, on_report=progress)
        print(format_table(reports))
        _write_json(args.json, [report_dict(report) for report in reports])
        return 0 if any(report.fits for report in reports) else 1

    report = compile_report(config, topology, with_cost=not args.no_cost,
                            judged_as=None if args.judge_as is None else CHIPS[args.judge_as])
    print(format_report(report, args.config))
    _write_json(args.json, report_dict(report))
    if not report.fits:
        print(not_fitting_message(report), file=sys.stderr)
        return 1
    return 0


def _write_json(path: str | None, values) -> None:
    if path:
        with open(path, "w") as file:
            json.dump(values, file, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(cli.run("aot", main))
