"""The `bmx` command: one entry point, the same exit codes and error line for every command."""

import importlib
import logging
import shutil
import subprocess
import sys
import tomllib

import pytest

from bmx import cli
from conftest import REPO_ROOT


def test_every_command_is_a_module_with_a_main():
    for command, (module, summary) in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), command
        assert summary


def test_no_command_prints_the_usage_and_fails(capsys):
    assert cli.main([]) == 2
    usage = capsys.readouterr().err
    assert all(f"  {command} " in usage for command in cli.COMMANDS)
    assert cli.main(["--help"]) == 0
    assert "bmx COMMAND" in capsys.readouterr().out


def test_an_unknown_command_is_one_line_naming_the_choices(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err == ("bmx: error: unknown command 'trian'; choose one of "
                                       + ", ".join(cli.COMMANDS) + "\n")


def test_bad_input_is_exit_2_with_one_line_and_bugs_keep_their_traceback(capsys):
    def bad_value(argv):
        raise ValueError("config.json: hidden_size\nmust be positive")

    def missing_file(argv):
        raise FileNotFoundError(2, "No such file or directory", "ckpt/config.json")

    def interrupted(argv):
        raise KeyboardInterrupt

    def bug(argv):
        raise KeyError("a bug")

    assert cli.run("eval", bad_value) == 2
    assert capsys.readouterr().err == "bmx eval: error: config.json: hidden_size must be positive\n"
    assert cli.run("eval", missing_file) == 2
    assert capsys.readouterr().err == "bmx eval: error: ckpt/config.json: No such file or directory\n"
    assert cli.run("merge", interrupted) == 130
    with pytest.raises(KeyError):
        cli.run("merge", bug)


def test_prog_follows_how_the_command_was_invoked():
    assert cli.prog("eval") == "python -m bmx.eval"
    assert cli.prog("aot") == "python -m bmx.train.aot"


def test_the_console_script_is_declared_and_installed():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["bmx"] == "bmx.cli:console_script"
    executable = shutil.which("bmx", path=str(__import__("pathlib").Path(sys.executable).parent)) or shutil.which("bmx")
    assert executable, "pip install -e . installs the bmx command"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout


BAD_INPUT = {  # command -> arguments naming a path that does not exist ({missing}) and an output ({out})
    "train": ["--config", "{missing}/run.yaml"],
    "aot": ["--config", "{missing}/run.yaml", "--topology", "v5p:2x2x1"],
    "data": ["prepare", "{missing}/pmc", "--out", "{out}"],
    "convert": ["hf-to-bmx", "{missing}/hf", "{out}"],
    "eval": ["--ckpt", "{missing}/ckpt", "--tasks", "medqa", "--data-dir", "{missing}/eval", "--out", "{out}"],
    "merge": ["{missing}/merge.yaml", "{out}"],
    "quant": ["--ckpt", "{missing}/ckpt", "--method", "int8", "--out", "{out}"],
    "generate": ["--ckpt", "{missing}/ckpt", "--prompt", "Aspirin"],
}


@pytest.fixture
def root_logging():
    """Commands configure logging when they run as the program; put the test session's back."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_bad_input_is_one_line_naming_it_whichever_way_the_command_runs(command, tmp_path, capsys, root_logging):
    assert set(BAD_INPUT) == set(cli.COMMANDS)
    missing = tmp_path / "nowhere"
    argv = [arg.format(missing=missing, out=tmp_path / "out") for arg in BAD_INPUT[command]]
    module_main = importlib.import_module(cli.COMMANDS[command][0]).main
    for run in (lambda: cli.main([command, *argv]), lambda: module_main(argv)):
        assert run() == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"bmx {command}: error: ") and str(missing) in lines[0], lines
    assert not (tmp_path / "out").exists()
