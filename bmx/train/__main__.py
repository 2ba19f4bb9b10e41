"""python -m bmx.train --config FILE [key.sub=value ...] [--export-hf DIR]

The same command on one CPU, one GPU, a GPU cluster or a TPU pod; only the config changes.
Re-running it resumes from the newest complete checkpoint in the run directory.
"""

import argparse
import logging
import sys

from bmx.config_io import ConfigError, load_config
from bmx.train.config import RunConfig
from bmx.compile_cache import enable_compile_cache


def main(argv=None) -> int:
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    parser = argparse.ArgumentParser(prog="python -m bmx.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--export-hf", default=None, help="write the final model as a Hugging Face directory")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(RunConfig, args.config, args.overrides)
    except (ConfigError, ValueError) as error:  # ValueError: a section's own check (e.g. lora)
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.export_hf:
        config.export_hf = args.export_hf
    from bmx.distributed import initialize

    initialize(config.distributed)  # before anything touches a device
    from bmx.train.loop import train

    try:
        train(config)
    except ConfigError as error:  # found once the data and the devices are known
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # bad data or checkpoints, a full disk, a read-only run_dir
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:  # without the "[Errno N]" prefix
        return error.strerror + (f": {error.filename}" if error.filename else "")
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    from bmx.train.host_memory import reexec_with_retained_memory

    reexec_with_retained_memory()
    sys.exit(main())
