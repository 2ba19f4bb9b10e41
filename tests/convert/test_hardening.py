"""Conversion refuses files that lie about their layout, as the safetensors library does, and cleans up.

Each bad input is refused with one line naming the file (exit 2), before anything is written; an
interrupted conversion leaves no output and no staging directory, and a staging directory left by a
killed process is reclaimed by the next run.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_reference import save_tiny_hf_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bmx.convert import CheckpointFormatError, SafetensorsReader, hf_to_bmx
from bmx.convert.__main__ import main as convert_cli

Q_PROJ, O_PROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "model"
    save_tiny_hf_model(directory)
    return directory


def copy_model(source, target):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def split_file(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_file(path, header, data, raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def overlap(header, data):  # the probe: q_proj's offsets point at o_proj's bytes
    header[Q_PROJ]["data_offsets"] = list(header[O_PROJ]["data_offsets"])
    return header, data, None


def trailing_bytes(header, data):
    return header, data + bytes(8), None


def short_range(header, data):  # a byte range shorter than the shape it claims
    header[Q_PROJ]["shape"] = [64, 65]
    return header, data, None


def truncated(header, data):
    return header, data[:-100], None


def not_utf8(header, data):
    raw = json.dumps(header).encode().replace(Q_PROJ.encode(), Q_PROJ.encode()[:-1] + b"\xff", 1)
    return header, data, raw


CORRUPTIONS = {
    overlap: "overlaps tensor",
    trailing_bytes: "bytes after the last tensor",
    short_range: "needs 16640",
    truncated: "runs past the end of the file",
    not_utf8: "unreadable safetensors header",
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=lambda f: f.__name__)
def test_a_lying_header_is_refused_as_the_safetensors_library_refuses_it(tmp_path, tiny_hf, corrupt, capsys):
    model = copy_model(tiny_hf, tmp_path / "hf")
    file = model / "model.safetensors"
    write_file(file, *corrupt(*split_file(file)))
    with pytest.raises(SafetensorError):
        with safe_open(str(file), "np") as handle:
            [handle.get_tensor(name) for name in handle.keys()]
    assert convert_cli(["hf-to-bmx", str(model), str(tmp_path / "bmx")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"bmx convert: error: {file}: ") and CORRUPTIONS[corrupt] in error and "\n" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, no staging debris


def sharded_model(tmp_path, tiny_hf):
    """The tiny model split into two shards with an index, as transformers writes them."""
    model = copy_model(tiny_hf, tmp_path / "hf")
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, members in shards.items():
        save_file({name: tensors[name] for name in members}, model / file, metadata={"format": "pt"})
    weight_map = {name: file for file, members in shards.items() for name in members}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model, tensors, weight_map


def test_a_tensor_in_two_shards_or_in_a_shard_the_index_does_not_map_it_to_names_both_files(tmp_path, tiny_hf):
    model, tensors, weight_map = sharded_model(tmp_path, tiny_hf)
    assert set(SafetensorsReader(model).names()) == set(tensors)  # the well-formed split reads back whole
    first, second = (model / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    stray = next(name for name, file in weight_map.items() if file == second.name)
    save_file({**load_file(first), stray: tensors[stray]}, first, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=rf"{stray!r} is stored twice: in .*00001.* and in .*00002"):
        SafetensorsReader(model)
    save_file({name: t for name, t in load_file(second).items() if name != stray}, second, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=rf"{stray!r} is in {first}.* maps it to {second}"):
        SafetensorsReader(model)


def test_an_index_entry_outside_the_model_directory_is_refused(tmp_path, tiny_hf):
    model, _, weight_map = sharded_model(tmp_path, tiny_hf)
    outside = tmp_path / "elsewhere.safetensors"
    (model / "model-00002-of-00002.safetensors").rename(outside)
    escaped = {name: ("../elsewhere.safetensors" if "00002" in file else file) for name, file in weight_map.items()}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": escaped}))
    with pytest.raises(CheckpointFormatError, match=r"maps a tensor to '../elsewhere.safetensors', which is not a file inside"):
        SafetensorsReader(model)
    escaped = {name: (str(outside) if "00002" in file else file) for name, file in weight_map.items()}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": escaped}))
    with pytest.raises(CheckpointFormatError, match="which is not a file inside"):
        SafetensorsReader(model)


def test_non_float_weights_and_a_bad_config_json_are_refused_naming_the_file(tmp_path, tiny_hf, capsys):
    model = copy_model(tiny_hf, tmp_path / "hf")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)  # the probe
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert convert_cli(["hf-to-bmx", str(model), str(tmp_path / "bmx")]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{model / 'model.safetensors'}: tensor 'model.norm.weight' is stored as I32" in error and "\n" not in error
    config = model / "config.json"
    config.write_text(config.read_text()[:-20])  # cut short
    assert convert_cli(["hf-to-bmx", str(model), str(tmp_path / "bmx")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"bmx convert: error: {config}: not valid JSON") and "\n" not in error
    config.write_text(json.dumps({"model_type": "mistral", "hidden_act": "gelu"}))
    assert convert_cli(["hf-to-bmx", str(model), str(tmp_path / "bmx")]) == 2
    assert capsys.readouterr().err.startswith(f"bmx convert: error: {config}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_sigterm_mid_conversion_stops_the_writers_and_leaves_nothing(tmp_path, tiny_hf, monkeypatch, capsys):
    reads = {"count": 0}
    original_read = SafetensorsReader.read

    def read_then_terminate(self, name):  # called from orbax's writer threads
        reads["count"] += 1
        if reads["count"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_read(self, name)

    monkeypatch.setattr(SafetensorsReader, "read", read_then_terminate)
    previous_handler = signal.getsignal(signal.SIGTERM)
    assert convert_cli(["hf-to-bmx", str(tiny_hf), str(tmp_path / "bmx")]) == 130
    assert "interrupted (stopped by SIGTERM): no output written" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == previous_handler
    assert list(tmp_path.iterdir()) == []  # the writers were stopped before the staging directory went


def test_a_rerun_removes_staging_directories_of_dead_processes_only(tmp_path, tiny_hf):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".bmx.partial-{int(finished.stdout)}"  # that process has exited: its pid is free
    alive = tmp_path / f".bmx.partial-{os.getppid()}"  # pytest's parent process still runs
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "params").write_bytes(np.zeros(1000).tobytes())
    hf_to_bmx(tiny_hf, tmp_path / "bmx", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "bmx"])


def damage(checkpoint, how):
    if how == "params metadata lost":
        for name in ("_METADATA", "_CHECKPOINT_METADATA"):
            (checkpoint / "params" / name).unlink(missing_ok=True)
        return checkpoint / "params"
    if how == "bmx_checkpoint.json cut short":
        path = checkpoint / "bmx_checkpoint.json"
        path.write_text(path.read_text()[:40])
        return path
    for file in (checkpoint / "params").rglob("*"):  # the stored arrays overwritten
        if file.is_file() and "ocdbt" in str(file) and "manifest" not in file.name:
            file.write_bytes(b"garbage")
    return checkpoint / "params"


@pytest.fixture(scope="module")
def tiny_bmx(tiny_hf, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("bmx") / "model"
    hf_to_bmx(tiny_hf, checkpoint, progress=False)
    return checkpoint


@pytest.mark.parametrize("how", ["params metadata lost", "bmx_checkpoint.json cut short", "arrays overwritten"])
def test_a_damaged_bmx_checkpoint_is_one_line_naming_it_in_eval_and_generate(tmp_path, tiny_bmx, how, capsys,
                                                                             shared_data):
    from bmx.eval.__main__ import main as eval_cli
    from bmx.generate.__main__ import main as generate_cli

    checkpoint = tmp_path / "bmx"
    shutil.copytree(tiny_bmx, checkpoint)
    damaged = damage(checkpoint, how)
    assert eval_cli(["--ckpt", str(checkpoint), "--tasks", "medqa", "--limit", "1", "--data-dir",
                     str(shared_data / "eval"), "--out", str(tmp_path / "eval")]) == 2
    assert generate_cli(["--ckpt", str(checkpoint), "--prompt", "Aspirin", "--max-new-tokens", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 2 and all(str(damaged) in line and "damaged" in line for line in errors), errors
    assert not (tmp_path / "eval").exists()
