"""`bmx COMMAND [ARGS]`: every bmx command under one name; `python -m bmx.COMMAND` runs the same code.

Every command ends the same way: exit 0 on success; exit 2 and one line `bmx COMMAND: error: ...`
naming the file, key or tensor on bad input (bmx raises `ValueError`s for those, and the operating
system `OSError`s for a missing file, a read-only directory or a full disk); exit 1 with the traceback
on anything else, which is a bug in bmx; 130 when interrupted.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# command -> (module with `main(argv) -> int`, one line for `bmx --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bmx.train.__main__", "continued pretraining or SFT from a YAML config (resumes a run directory)"),
    "aot": ("bmx.train.aot", "compile the train step for a TPU slice on a CPU: does it fit, how fast"),
    "data": ("bmx.data.__main__", "PMC/PubMed/text → packed Mistral-token shards (prepare, prepare-sft)"),
    "convert": ("bmx.convert.__main__", "Hugging Face ⇄ bmx checkpoints, merge-lora and other exports"),
    "eval": ("bmx.eval.__main__", "the medical QA tasks under BioMistral's or lm-eval's protocol"),
    "merge": ("bmx.merge.__main__", "merge models from a mergekit YAML config"),
    "quant": ("bmx.quant.__main__", "quantize a checkpoint (int8, nf4, fp4, awq, rtn) and export it"),
    "generate": ("bmx.generate.__main__", "generate text from a checkpoint (greedy or sampled)"),
}

_console_command: str | None = None  # set when the `bmx` console script dispatches a command


def prog(command: str) -> str:
    """The program name a command's argparse shows: how the user invoked it."""
    if _console_command == command:
        return f"bmx {command}"
    module = COMMANDS[command][0].removesuffix(".__main__")
    return f"python -m {module}"


def is_program(command: str, argv: Sequence[str] | None) -> bool:
    """Whether a command's `main(argv)` runs as the program (`bmx COMMAND` or `python -m`), not called from Python."""
    return argv is None or _console_command == command


def one_line(error: BaseException | str) -> str:
    """The message on one line; an `OSError` without its "[Errno N]" prefix and with the file it names."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = " ".join(text.split())
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        names = [str(name) for name in (error.filename, error.filename2) if name is not None]
        text = f"{' -> '.join(names)}: {text}"
    return text or type(error).__name__


def fail(command: str, error: BaseException | str) -> int:
    """Report bad input the way every command does; returns the exit code."""
    print(f"bmx {command}: error: {one_line(error)}", file=sys.stderr)
    return 2


def run(command: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`, turning bad input into exit 2 with one line and an interrupt into 130."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"bmx {command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        return fail(command, error)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bmx COMMAND [ARGS]   (bmx COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    global _console_command
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"bmx {version('bmx')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bmx: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    _console_command = command
    try:
        return run(command, module.main, rest)
    finally:
        _console_command = None


def console_script() -> None:
    """The `bmx` executable (`[project.scripts]`)."""
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        from bmx.train.host_memory import reexec_with_retained_memory

        reexec_with_retained_memory()
    sys.exit(main())


if __name__ == "__main__":
    console_script()
