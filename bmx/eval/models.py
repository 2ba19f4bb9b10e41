"""From `--ckpt DIR` to an `EvalModel`: any model directory `bmx.checkpoints.load` reads.

A bmx checkpoint, a quantized one or a Hugging Face directory (read in memory), local or `gs://`.
The tokenizer is the one saved with the model (`bmx.checkpoints.find_tokenizer`); without one,
Mistral v0.1's SentencePiece model.
"""

from __future__ import annotations

import os

import jax
from etils import epath

from bmx.eval.evaluate import EvalModel
from bmx.eval.scorers import JaxModelScorer
from bmx.tokenizer import load_tokenizer


def load_eval_model(ckpt: str | os.PathLike, *, tokenizer: str | None = None, dtype=None, max_length: int | None = None,
                    name: str | None = None) -> EvalModel:
    """Load `ckpt` (any kind of model directory) for evaluation on all local devices."""
    from bmx.checkpoints import find_tokenizer, load

    # On CPU the decoding layout scores faster (a 16-bit model about twice as fast: its products
    # outputs-first, no per-layer weight copies out of the scan), and generation can share it.
    model, _ = load(ckpt, dtype=dtype, decoding_layout=jax.default_backend() == "cpu")
    return EvalModel(name=name or epath.Path(ckpt).name, scorer=JaxModelScorer(model, max_length=max_length),
                     tokenizer=load_tokenizer(tokenizer or find_tokenizer(ckpt)))
