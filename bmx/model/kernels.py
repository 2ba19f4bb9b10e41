"""The attention kernels behind one switch, `Mistral(config, attention=...)` (`model.attention` in a
run config): `xla`, `cudnn` or `splash`.

Each computes exactly what `grouped_query_attention` computes (causal, Mistral's sliding window,
padding and packed documents), on the same shapes: queries `[batch, seq, kv_heads, queries_per_kv,
head_dim]`, keys/values `[batch, seq, kv_heads, head_dim]`.

- `cudnn`: `jax.nn.dot_product_attention` with `local_window_size`, cuDNN's flash attention on
  NVIDIA GPUs (bf16/fp16 only). Causality and the window are built into the kernel; padding and
  document masks are passed as a dense boolean mask, which cuDNN turns into a `[seq, seq]` bias.
- `splash`: Pallas splash attention on TPU, with a `LocalMask` for the window (blocks outside it are
  skipped, so cost grows as seq × window), GQA natively (K/V heads are never repeated), and packed
  documents and padding as segment ids. Under a mesh it runs per device through `shard_map`,
  batch and heads split as the logical-axis rules say. A sequence that is not a multiple of the
  tile (or of 128 when shorter than one) is padded at the end; causality keeps real queries from
  seeing the padding.

Rows of padded queries are the one difference from the XLA path: there they see only other padding
rather than nothing, a value no loss or logit reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bmx.model import sharding
from bmx.model.attention import AttentionMasking, grouped_query_attention

SPLASH_BLOCK = 512  # splash's query/key tile; shorter sequences use one tile of their own length
SPLASH_LANES = 128  # splash tiles are multiples of the TPU's 128 lanes
_PADDING_SEGMENT = jnp.iinfo(jnp.int32).min  # a segment id no real document has


def default_attention(platform: str, dtype) -> str:
    """The kernel a platform runs best: splash on TPU, cuDNN on GPU (which needs 16-bit inputs), else XLA."""
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


# ---- cuDNN (jax.nn.dot_product_attention) -------------------------------------------------------

def _dense_allowed(masking: AttentionMasking) -> jax.Array | None:
    """[batch, 1, seq, seq] bool for padding and documents, or None when causality + window say it all."""
    allowed = None
    if masking.segment_ids is not None:
        allowed = masking.segment_ids[:, :, None] == masking.segment_ids[:, None, :]
    if masking.key_is_valid is not None:
        valid = masking.key_is_valid[:, None, :]
        allowed = valid if allowed is None else allowed & valid
    return None if allowed is None else allowed[:, None]


def cudnn_attention(q, k, v, masking: AttentionMasking, scale: float, *, implementation: str = "cudnn"):
    """`implementation="xla"` runs the same call through XLA, to check the argument mapping off-GPU."""
    batch, seq, kv_heads, queries_per_kv, head_dim = q.shape
    window = masking.sliding_window
    out = jax.nn.dot_product_attention(
        q.reshape(batch, seq, kv_heads * queries_per_kv, head_dim), k, v, mask=_dense_allowed(masking),
        scale=scale, is_causal=True,
        # (keys to the left, keys to the right): the query itself plus window - 1 earlier tokens.
        local_window_size=None if window is None or window >= seq else (window - 1, 0),
        implementation=implementation)
    return out.reshape(q.shape)


# ---- Pallas splash attention (TPU) --------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq: int, window: int | None, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    if window is None or window >= seq:
        head_mask = masks.CausalMask((seq, seq))
    else:  # key j is seen by query i iff i - (window - 1) <= j <= i
        head_mask = masks.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(masks.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash_segments(masking: AttentionMasking, batch: int, seq: int) -> jax.Array | None:
    """[batch, seq] int32 segment ids carrying both documents and padding, or None."""
    if masking.segment_ids is None and masking.key_is_valid is None:
        return None
    segments = (jnp.zeros((batch, seq), jnp.int32) if masking.segment_ids is None
                else masking.segment_ids.astype(jnp.int32))
    if masking.key_is_valid is not None:
        segments = jnp.where(masking.key_is_valid, segments, _PADDING_SEGMENT)
    return segments


def _splash_local(q, k, v, segments, *, window: int | None, scale: float, interpret: bool):
    """One device's share: q [b, s, kv, g, d], k/v [b, s, kv, d], segments [b, s] or None."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    batch, seq, kv_heads, queries_per_kv, head_dim = q.shape
    kernel = _splash_kernel(kv_heads * queries_per_kv, seq, window, min(SPLASH_BLOCK, seq), interpret)
    # Heads-major layouts; query head h = kv * queries_per_kv + g reads K/V head h // queries_per_kv.
    q_heads = (q * jnp.asarray(scale, q.dtype)).reshape(batch, seq, -1, head_dim).transpose(0, 2, 1, 3)
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segments is None:
        out = jax.vmap(kernel)(q_heads, k_heads, v_heads)
    else:
        out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=SegmentIds(q=s_, kv=s_)))(
            q_heads, k_heads, v_heads, segments)
    return out.transpose(0, 2, 1, 3).reshape(q.shape)


def splash_attention(q, k, v, masking: AttentionMasking, scale: float, *, interpret: bool | None = None):
    """`interpret`: run the Pallas kernel in its interpreter; by default exactly when the target is a CPU
    (tests), never when compiling for a TPU, even from a CPU host."""
    batch, seq = q.shape[:2]
    # Tiles are SPLASH_BLOCK long, or one tile for a shorter sequence; the kernel's lanes want multiples of 128.
    tile = SPLASH_BLOCK if seq > SPLASH_BLOCK else -(-seq // SPLASH_LANES) * SPLASH_LANES
    padded = -(-seq // tile) * tile
    if padded != seq:
        q, k, v = (jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v))
        masking = AttentionMasking(*(None if m is None else jnp.pad(m, [(0, 0), (0, padded - seq)])
                                     for m in (masking.key_is_valid, masking.segment_ids)), masking.sliding_window)
    return _splash_padded(q, k, v, masking, scale, interpret)[:, :seq]


def _splash_padded(q, k, v, masking: AttentionMasking, scale: float, interpret: bool | None):
    batch, seq = q.shape[:2]
    segments = _splash_segments(masking, batch, seq)
    active = sharding.active_logical_sharding()
    if interpret is None:
        platform = jax.default_backend() if active is None else active[0].devices.flat[0].platform
        interpret = platform == "cpu"
    local = functools.partial(_splash_local, window=masking.sliding_window, scale=scale, interpret=interpret)
    if active is None:
        return local(q, k, v, segments)
    # A Pallas kernel is opaque to the SPMD partitioner: run it on each device's block of batch and heads.
    mesh, rules = active
    q_spec = sharding.logical_to_spec(("activation_batch", None, "activation_kv_heads", None, None), rules)
    kv_spec = sharding.logical_to_spec(("activation_batch", None, "activation_kv_heads", None), rules)
    segment_spec = sharding.logical_to_spec(("activation_batch", None), rules)
    if segments is None:
        run = jax.shard_map(lambda q_, k_, v_: local(q_, k_, v_, None), mesh=mesh,
                            in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)
        return run(q, k, v)
    run = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                        check_vma=False)
    return run(q, k, v, segments)


# Every kernel computes what `grouped_query_attention` computes, on the same shapes.
ATTENTION_KERNELS: dict[str, Callable] = {"xla": grouped_query_attention, "cudnn": cudnn_attention,
                                          "splash": splash_attention}


def attention_kernel(name: str) -> Callable:
    """The kernel called `name`; an unknown name is an error listing the valid ones."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"model.attention: unknown implementation {name!r}; choose one of {list(ATTENTION_KERNELS)}")
    return ATTENTION_KERNELS[name]
