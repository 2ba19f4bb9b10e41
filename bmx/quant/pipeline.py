"""Checkpoint in, quantized checkpoint out: what `python -m bmx.quant` runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from bmx.checkpoints import checkpoint_kind, load
from bmx.model.mistral import Mistral
from bmx.quant.calibration import DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES, calibration_tokens, layer_by_layer
from bmx.quant.int8 import OUTLIER_THRESHOLD, outlier_columns_from
from bmx.quant.model import quantize_model
from bmx.quant.schemes import make_scheme
from bmx.quant.streaming import can_stream, stream_quantize


def load_float_model(ckpt: str | os.PathLike, compute_dtype=None) -> Mistral:
    """A float model from a bmx checkpoint or a Hugging Face directory (read in memory), local or `gs://`."""
    if checkpoint_kind(ckpt) == "quantized":
        raise ValueError(f"--ckpt {ckpt} is already quantized: quantize its float source instead")
    return load(ckpt, compute_dtype=compute_dtype)[0]


def find_outlier_columns(model: Mistral, tokens: np.ndarray, threshold: float = OUTLIER_THRESHOLD,
                         chunk: int = 8, progress: bool = True) -> dict[tuple[int, str], np.ndarray]:
    """(layer, linear path) → input features whose calibration activations reach `threshold`."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from bmx.quant.calibration import SAME_INPUT_AS
    from bmx.quant.model import LINEAR_PATHS

    def feature_absmax(path, x):
        return jnp.abs(x).reshape(-1, x.shape[-1]).max(axis=0)

    columns = {}
    for layer in tqdm(layer_by_layer(model, tokens, chunk, reduce=feature_absmax), total=model.config.num_hidden_layers,
                      desc="int8 outliers", unit="layer", disable=not progress):
        for path in LINEAR_PATHS:
            columns[layer.index, path] = outlier_columns_from(np.asarray(layer.inputs[SAME_INPUT_AS.get(path, path)]),
                                                              threshold)
    return columns


def quantize(model: Mistral, method: str, *, group_size: int = 128, blocksize: int = 64, double_quant: bool = False,
             calib_tokens: np.ndarray | None = None, outlier_threshold: float | None = None,
             duo_scaling: bool = False, progress: bool = True) -> Mistral:
    """Quantize the float `model` in place with `method` (int8, nf4, fp4, awq or rtn); returns it."""
    scheme = make_scheme(method, group_size=group_size, blocksize=blocksize, double_quant=double_quant,
                         outlier_threshold=outlier_threshold)
    if calib_tokens is not None and int(np.max(calib_tokens)) >= model.config.vocab_size:
        raise ValueError(f"calibration token id {int(np.max(calib_tokens))} is outside the model's vocabulary of "
                         f"{model.config.vocab_size}: the data was prepared with another tokenizer")
    if method == "awq":
        if calib_tokens is None:
            raise ValueError("awq needs calibration tokens (--calib DATA_DIR: a `python -m bmx.data prepare` output)")
        from bmx.quant.awq import awq_quantize

        return awq_quantize(model, calib_tokens, scheme, duo_scaling=duo_scaling, progress=progress)
    if method == "int8" and outlier_threshold is not None:
        if calib_tokens is None:
            raise ValueError("int8 outlier columns are found on calibration data: give --calib DATA_DIR")
        columns = find_outlier_columns(model, calib_tokens, outlier_threshold, progress=progress)
        return quantize_model(model, scheme, extra_args=lambda layer, path: {"outlier_columns": columns[layer, path]},
                              progress=progress)
    return quantize_model(model, scheme, progress=progress)


def refuse_existing_output(directory: str | os.PathLike) -> None:
    """Checked before the work starts, so a long AWQ run does not end on a name clash."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} already exists and is not empty; choose a new output directory")


def write_outputs(model: Mistral, out: str | os.PathLike, *, source: str | os.PathLike | None = None,
                  export_dir: str | os.PathLike | None = None, progress: bool = True,
                  export_format: str = "transformers") -> None:
    """The quantized bmx checkpoint `out` and, with `export_dir`, its HF layout: both or neither.

    An export directory inside `out` is built inside `out`'s staging directory; one elsewhere is
    written first, and removed again if the checkpoint then fails.
    """
    from bmx.quant.checkpoint import save_quantized
    from bmx.quant.hf_export import export_hf

    if export_dir is None:
        save_quantized(model, out, source=source)
        return
    out, export_dir = Path(out), Path(export_dir)
    try:
        inside = export_dir.resolve().relative_to(out.resolve())
    except ValueError:
        inside = None
    if inside is not None:
        save_quantized(model, out, source=source,
                       before_publish=lambda staging: export_hf(model, staging / inside, source=source,
                                                                progress=progress, export_format=export_format))
        return
    export_hf(model, export_dir, source=source, progress=progress, export_format=export_format)
    try:
        save_quantized(model, out, source=source)
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        raise


def quantize_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, method: str, *, group_size: int = 128,
                        blocksize: int = 64, double_quant: bool = False, calib: str | os.PathLike | None = None,
                        calib_samples: int = DEFAULT_SEQUENCES, calib_seq_len: int = DEFAULT_SEQ_LEN,
                        outlier_threshold: float | None = None, duo_scaling: bool = False,
                        export_hf: str | os.PathLike | None = None, progress: bool = True,
                        export_format: str = "transformers") -> Path:
    """Quantize the checkpoint `ckpt` into the bmx checkpoint `out` (and an HF directory with `export_hf`).

    Everything that can be checked up front is, before the model is loaded; the outputs appear
    only once complete.
    """
    import jax.numpy as jnp

    from bmx.quant.hf_export import check_exportable

    make_scheme(method, group_size=group_size, blocksize=blocksize, double_quant=double_quant)
    refuse_existing_output(out)
    if method == "int8" and calib is not None and outlier_threshold is None:
        outlier_threshold = OUTLIER_THRESHOLD
    if export_hf is not None:
        check_exportable(method, export_format, outlier_threshold if method == "int8" else None)
        if Path(export_hf).resolve() == Path(out).resolve():
            raise ValueError(f"--export-hf {export_hf} is --out itself; give another directory (default: OUT/hf_quantized)")
        refuse_existing_output(export_hf)
    if method == "awq" and calib is None:
        raise ValueError("awq needs calibration tokens (--calib DATA_DIR: a `python -m bmx.data prepare` output)")
    kind = checkpoint_kind(ckpt)
    if export_hf is None and kind == "bmx" and can_stream(method, calib, outlier_threshold):
        # Round-to-nearest needs only each weight: quantize layer by layer, never holding the float model.
        return stream_quantize(ckpt, out, make_scheme(method, group_size=group_size, blocksize=blocksize,
                                                      double_quant=double_quant))
    tokens = calibration_tokens(calib, calib_samples, calib_seq_len) if calib is not None else None
    # AWQ ranks its candidates by small differences in block output error: computed in float32, not bfloat16.
    model = load_float_model(ckpt, compute_dtype=jnp.float32 if method == "awq" else None)
    quantize(model, method, group_size=group_size, blocksize=blocksize, double_quant=double_quant,
             calib_tokens=tokens, outlier_threshold=outlier_threshold, duo_scaling=duo_scaling, progress=progress)
    source = ckpt if kind == "bmx" else None
    write_outputs(model, out, source=source, export_dir=export_hf, progress=progress, export_format=export_format)
    return Path(out)
