"""Model FLOPs per token and peak device FLOP/s (from the chip table, `bmx.train.chips`), for MFU.

Training FLOPs per token = 3 × forward (backward ≈ 2 × forward). Forward per token:
- matmuls: 2 × (q, k, v, o projections with GQA's smaller k/v + 3 SwiGLU matrices) per layer, + LM head;
- attention: 2 × 2 × heads × head_dim × span per layer (QKᵀ and PV), where span is the average number
  of keys a query sees: (n + 1) / 2 for causal attention over n tokens, capped by the sliding window.
Rematerialisation is not counted (MFU counts model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from bmx.model.config import MistralConfig
from bmx.train.chips import chip_for_device_kind


def average_attention_span(seq_len: int, sliding_window: int | None) -> float:
    """Mean over positions i = 0..n-1 of the number of keys seen, min(i + 1, window)."""
    window = seq_len if sliding_window is None else min(sliding_window, seq_len)
    # positions before the window fills see i + 1 keys, the rest see `window`.
    total = window * (window + 1) / 2 + (seq_len - window) * window
    return total / seq_len


def training_flops_per_token(config: MistralConfig, seq_len: int) -> float:
    hidden, head_dim = config.hidden_size, config.head_dim
    projections = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * hidden * config.intermediate_size
    matmul_params = config.num_hidden_layers * (projections + mlp) + hidden * config.vocab_size
    attention = (config.num_hidden_layers * 4 * config.num_attention_heads * head_dim
                 * average_attention_span(seq_len, config.sliding_window))
    return 3 * (2 * matmul_params + attention)


_measured_peak: dict[str, float] = {}


def measured_matmul_peak(device) -> float:
    """FLOP/s of a large float32 matmul on `device`: the practical peak of a device without a datasheet entry."""
    key = str(device)
    if key not in _measured_peak:
        size = 1024
        a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        repeats, best = 4, 0.0
        for _ in range(5):  # the best of five rounds: a busy moment must not lower the peak (and inflate MFU)
            start = time.perf_counter()
            for _ in range(repeats):
                out = matmul(a)
            out.block_until_ready()
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
        _measured_peak[key] = best
    return _measured_peak[key]


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return override, "config"
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    chip = chip_for_device_kind(kind)
    if chip is not None:
        return chip.peak_flops, f"datasheet ({kind}: {chip.source.split(':')[0]})"
    return measured_matmul_peak(device), f"measured float32 matmul ({kind or device.platform})"
