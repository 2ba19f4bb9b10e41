"""Mistral in Flax NNX: `Mistral`, its `MistralConfig`, presets, its `KVCache`, and `load` for bmx checkpoints."""

from bmx.model.config import PRESETS, MistralConfig, preset
from bmx.model.kv_cache import KVCache
from bmx.model.mistral import REMAT_POLICIES, Mistral, unstack_layers

__all__ = ["MistralConfig", "Mistral", "KVCache", "PRESETS", "REMAT_POLICIES", "preset", "load", "unstack_layers"]


def load(ckpt_dir, dtype=None, **kwargs):
    """Load a bmx float checkpoint: `(model, config)`. See `bmx.model.checkpoint.load`; for any kind of
    checkpoint (quantized, Hugging Face, `gs://`), `bmx.checkpoints.load`."""
    from bmx.model.checkpoint import load as _load

    return _load(ckpt_dir, dtype=dtype, **kwargs)
