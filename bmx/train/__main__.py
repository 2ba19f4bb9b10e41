"""bmx train --config FILE [key.sub=value ...] [--export-hf DIR]   (or python -m bmx.train)

The same command on one CPU, one GPU, a GPU cluster or a TPU pod; only the config changes.
Re-running it resumes from the newest complete checkpoint in the run directory. A bad config, data or
run directory is one line `bmx train: error: ...` naming the key or file (exit 2); SIGINT/SIGTERM save a
checkpoint and exit 0.
"""

import sys

if __name__ == "__main__":  # before the imports below: a re-exec would otherwise pay for jax's import twice
    from bmx.train.host_memory import reexec_with_retained_memory

    reexec_with_retained_memory()

import argparse  # noqa: E402
import logging  # noqa: E402

from bmx import cli  # noqa: E402
from bmx.config_io import load_config  # noqa: E402
from bmx.train.config import RunConfig  # noqa: E402
from bmx.compile_cache import enable_compile_cache  # noqa: E402


def main(argv=None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    parser = argparse.ArgumentParser(prog=cli.prog("train"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--export-hf", default=None, help="write the final model as a Hugging Face directory")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(RunConfig, args.config, args.overrides)
    except (ValueError, OSError) as error:  # a ConfigError naming the key, or a section's own check (e.g. lora)
        return cli.fail("train", error)
    if args.export_hf:
        config.export_hf = args.export_hf
    from bmx.distributed import initialize

    initialize(config.distributed)  # before anything touches a device
    from bmx.train.loop import train

    # Config errors found once the data and devices are known, bad data or checkpoints, a full disk, a
    # read-only run_dir. SIGINT/SIGTERM do not get here: the loop saves a checkpoint and returns.
    try:
        train(config)
    except (ValueError, OSError) as error:
        return cli.fail("train", error)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("train", main))
