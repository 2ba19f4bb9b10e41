"""`python -m bmx.quant`: quantize, export, re-export and import; errors name what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bmx.checkpoints import load
from bmx.quant.__main__ import main
from bmx.quant.layers import QuantizedLinear
from bmx.quant.model import LINEAR_PATHS, linear_at


def test_quantize_nf4_with_export_then_import(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["--ckpt", str(tiny_ckpt), "--method", "nf4", "--double-quant", "--out", str(out), "--export-hf"]) == 0
    assert "2/2" in capsys.readouterr().err  # progress per layer (the tiny model has 2)
    model, _ = load(out)
    assert all(isinstance(linear_at(model.model.layers, path), QuantizedLinear) for path in LINEAR_PATHS)
    exported = out / "hf_quantized"
    assert json.loads((exported / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"]
    assert main(["--import-hf", str(exported), "--out", str(tmp_path / "imported")]) == 0
    imported, _ = load(tmp_path / "imported")
    down = linear_at(imported.model.layers, "mlp.down_proj")
    np.testing.assert_array_equal(np.asarray(down.packed[...]),
                                  np.asarray(linear_at(model.model.layers, "mlp.down_proj").packed[...]))
    assert main(["--ckpt", str(out), "--export-hf", str(tmp_path / "again")]) == 0  # re-export
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()


def test_int8_with_calibration_finds_outlier_columns(tiny_ckpt, pmc_tokens, tmp_path):
    out = tmp_path / "int8"
    assert main(["--ckpt", str(tiny_ckpt), "--method", "int8", "--calib", str(pmc_tokens), "--calib-samples", "2",
                 "--calib-seq-len", "64", "--outlier-threshold", "3.5", "--out", str(out), "--no-progress"]) == 0
    metadata = json.loads((out / "bmx_checkpoint.json").read_text())["quantization"]
    assert metadata["scheme"] == {"method": "int8", "outlier_threshold": 3.5}
    model, _ = load(out)
    assert linear_at(model.model.layers, "self_attn.q_proj").outlier_columns[...].shape[1] > 0


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmx quant: error: "), lines
    return lines[0]


@pytest.mark.parametrize("arguments, message", [
    (["--method", "awq"], "awq needs calibration tokens"),
    (["--method", "nf4", "--blocksize", "48"], "blocksize must be one of"),
    (["--method", "rtn", "--group-size", "100"], "must be a multiple of the group size"),
    (["--method", "int8", "--export-hf"], "int8 checkpoints are kept in bmx's format only"),
    (["--method", "awq", "--calib", "no/such/data"], "manifest.json not found: run `python -m bmx.data prepare"),
])
def test_bad_requests_are_one_line_errors_and_write_nothing(tiny_ckpt, tmp_path, capsys, arguments, message):
    assert main(["--ckpt", str(tiny_ckpt), *arguments, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_before_any_work(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    assert main(["--ckpt", str(tiny_ckpt), "--method", "nf4", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "already exists and is not empty" in one_line_error(capsys)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("export_inside_out", [True, False], ids=["export-inside-out", "export-elsewhere"])
def test_a_failed_write_leaves_no_output_that_looks_complete(tiny_ckpt, tmp_path, capsys, monkeypatch,
                                                             export_inside_out):
    from bmx.convert.safetensors_io import ShardedSafetensorsWriter
    from bmx.quant import checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if export_inside_out:  # the HF export, written last into the checkpoint's staging directory, fails
        monkeypatch.setattr(ShardedSafetensorsWriter, "finish", disk_full)
        export = []
    else:  # the HF export is written, then the bmx checkpoint fails: the export goes too
        monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full)
        export = [str(tmp_path / "exported")]
    assert main(["--ckpt", str(tiny_ckpt), "--method", "nf4", "--out", str(tmp_path / "out"), "--export-hf", *export,
                 "--no-progress"]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


