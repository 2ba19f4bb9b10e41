"""Mistral for causal language modelling in Flax NNX, parameter paths mirroring transformers'.

    Mistral
    ├── model
    │   ├── embed_tokens.weight                         [vocab, embed]
    │   ├── layers  (stacked: leading `layers` axis, applied with a scan)
    │   │   ├── input_layernorm.weight                  [layers, embed]
    │   │   ├── self_attn.{q,k,v}_proj.kernel           [layers, embed, (kv_)heads, head_dim]
    │   │   ├── self_attn.o_proj.kernel                 [layers, heads, head_dim, embed]
    │   │   ├── post_attention_layernorm.weight         [layers, embed]
    │   │   └── mlp.{gate,up,down}_proj.kernel          [layers, embed, mlp] / [layers, mlp, embed]
    │   └── norm.weight                                 [embed]
    └── lm_head.kernel                                  [embed, vocab]   (absent when tied)

One forward pass serves training, prefill and decoding: `Mistral(config)(input_ids)` gives logits;
`Mistral(config)(input_ids, mask, cache=KVCache.empty(...))` also fills the cache from the prompt,
and each later call with the returned cache adds one token per row (`bmx.generate` drives it).
`unstack_layers(model)` gives the same model with its layers as separate modules (used to decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bmx.model import kv_cache as kv
from bmx.model.attention import AttentionMasking, apply_rotary, attention_over_cache, rotary_cos_sin
from bmx.model.config import MistralConfig
from bmx.model.kernels import attention_kernel, default_attention
from bmx.model.kv_cache import KVCache
from bmx.model.layers import Embedding, Linear, RMSNorm, SwiGLU
from bmx.model.sharding import constrain

# What a rematerialised layer keeps for the backward pass (jax.checkpoint policies).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls only
}

HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")

LayerCache = tuple[jax.Array, jax.Array]  # one layer's (keys, values), each [batch, slots, kv_heads, head_dim]


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions, running the kernel named by `attention`."""

    def __init__(self, config, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        common = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear((hidden,), (heads, head_dim), ("embed", "heads", "head_dim"), **common)
        self.k_proj = Linear((hidden,), (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **common)
        self.v_proj = Linear((hidden,), (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **common)
        self.o_proj = Linear((heads, head_dim), (hidden,), ("heads", "head_dim", "embed"), **common)
        attention_kernel(attention)  # an unknown name fails here, not at the first call
        self.attention = attention
        self.kv_heads = kv_heads
        self.queries_per_kv = heads // kv_heads
        self.scale = head_dim ** -0.5

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, masking: AttentionMasking,
                 kv_cache: LayerCache | None = None, write_index: jax.Array | None = None):
        """Without `kv_cache`: the output `[batch, seq, embed]`. With it: `(output, updated kv_cache)`.

        `write_index` None: `x` is the whole prompt; it attends to itself with the configured kernel
        and its last `slots` keys and values fill the cache. A scalar: `x` is one new token per row,
        written at that sequence index; `masking.key_is_valid [batch, slots]` says which slots it sees.
        """
        batch, seq = x.shape[:2]
        q = apply_rotary(self.q_proj(x), cos, sin)  # [batch, seq, heads, head_dim]
        k = apply_rotary(self.k_proj(x), cos, sin)  # [batch, seq, kv_heads, head_dim]
        v = self.v_proj(x)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))
        v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))
        # Query head h belongs to KV head h // queries_per_kv, as in transformers' repeat_kv.
        q = q.reshape(batch, seq, self.kv_heads, self.queries_per_kv, q.shape[-1])
        if kv_cache is not None and write_index is not None:
            keys = kv.store_step(kv_cache[0], k, write_index, kv.KEY_SLOT_AXIS)
            values = kv.store_step(kv_cache[1], v, write_index, kv.VALUE_SLOT_AXIS)
            out = attention_over_cache(q, keys, values, masking.key_is_valid, self.scale)
            kv_cache = (keys, values)
        else:
            out = attention_kernel(self.attention)(q, k, v, masking, self.scale)
            if kv_cache is not None:
                kv_cache = (kv.store_prompt(kv_cache[0], k, kv.KEY_SLOT_AXIS),
                            kv.store_prompt(kv_cache[1], v, kv.VALUE_SLOT_AXIS))
        out = self.o_proj(out.reshape(batch, seq, -1, out.shape[-1]))
        return out if kv_cache is None else (out, kv_cache)


class DecoderLayer(nnx.Module):
    def __init__(self, config: MistralConfig, *, attention: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Attention(config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, std=config.initializer_range,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden, cos, sin, masking: AttentionMasking, kv_cache: LayerCache | None = None,
                 write_index: jax.Array | None = None):
        """As `Attention`: the new hidden states, and the layer's updated cache when given one."""
        attended = self.self_attn(self.input_layernorm(hidden), cos, sin, masking, kv_cache, write_index)
        if kv_cache is not None:
            attended, kv_cache = attended
        hidden = hidden + attended
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        hidden = constrain(hidden, HIDDEN_AXES)
        return hidden if kv_cache is None else (hidden, kv_cache)


class MistralModel(nnx.Module):
    """Embedding, the decoder layers (stacked and scanned, or a list: see `unstack_layers`) and the final norm."""

    def __init__(self, config: MistralConfig, *, attention: str, dtype, param_dtype, remat: str, rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.config = config
        self.remat = remat
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, std=config.initializer_range,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def stacked_layers(layer_rngs):
            return DecoderLayer(config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=layer_rngs)

        self.layers = stacked_layers(rngs)
        for _, variable in nnx.iter_graph(self.layers):
            if isinstance(variable, nnx.Param):
                variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, positions, masking: AttentionMasking, cache: list[LayerCache] | None = None,
                 write_index: jax.Array | None = None):
        """Final-norm hidden states, and the per-layer caches when given them (see `Attention`)."""
        config = self.config
        hidden = constrain(self.embed_tokens(input_ids), HIDDEN_AXES)
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta)

        def apply_layer(layer_graph, params, hidden, layer_cache):
            output = nnx.merge(layer_graph, params)(hidden, cos, sin, masking, layer_cache, write_index)
            return output if layer_cache is not None else (output, None)

        if self.remat != "none":
            apply_layer = jax.checkpoint(apply_layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False,
                                         static_argnums=(0,))
        if isinstance(self.layers, nnx.List):  # unstacked (`unstack_layers`): one layer after another
            caches = []
            for i, layer in enumerate(self.layers):
                hidden, layer_cache = apply_layer(*nnx.split(layer), hidden, None if cache is None else cache[i])
                caches.append(layer_cache)
        else:
            hidden, caches = self._scan_layers(apply_layer, hidden, cache)
        hidden = self.norm(hidden)
        return hidden if cache is None else (hidden, caches)

    def _scan_layers(self, apply_layer, hidden, cache):
        """The stacked layers in a `jax.lax.scan`, each layer's cache (if any) stacked alongside its parameters."""
        layer_graph, layer_params = nnx.split(self.layers)
        stacked = None if cache is None else jax.tree.map(lambda *layers: jnp.stack(layers), *cache)

        def scan_step(hidden, inputs):
            params, layer_cache = inputs
            return apply_layer(layer_graph, params, hidden, layer_cache)

        hidden, stacked = jax.lax.scan(scan_step, hidden, (layer_params, stacked))
        caches = None if cache is None else [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(cache))]
        return hidden, caches


class Mistral(nnx.Module):
    """`Mistral(config)(input_ids, attention_mask=None) -> logits [batch, seq, vocab]` in float32.

    `dtype` is the computation dtype (bfloat16 on accelerators), `param_dtype` the storage dtype.
    Softmax, norms' statistics and logits are always float32. `attention` names the kernel
    (`bmx.model.kernels`: `xla`, `cudnn`, `splash`); None picks the default backend's best.
    """

    def __init__(self, config: MistralConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention: str | None = None, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.attention = attention or default_attention(jax.default_backend(), dtype)
        self.model = MistralModel(config, attention=self.attention, dtype=dtype, param_dtype=param_dtype,
                                  remat=remat, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"),
                                  std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states `[batch, seq, embed]` (what the chunked loss consumes)."""
        key_is_valid = None if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(input_ids, attention_mask)
        masking = AttentionMasking(key_is_valid, segment_ids, self.config.sliding_window)
        return self.model(input_ids, positions, masking)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden, out_dtype=jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 cache: KVCache | None = None):
        """Logits `[batch, seq, vocab]`; with a `cache`, `(logits of each row's last token [batch, 1, vocab],
        updated cache)`.

        A fresh cache (`KVCache.empty`) is filled from `input_ids`, the left-padded prompts, attended
        with the configured kernel. A filled cache takes `input_ids [batch, 1]`: one new token per
        row, at each row's next position.
        """
        if cache is None:
            hidden = self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
            return self.logits(hidden)
        if segment_ids is not None:
            raise ValueError("segment_ids (packed documents) cannot be decoded with a KV cache")
        if cache.filled:
            return self._extend(input_ids, cache)
        return self._prefill(input_ids, attention_mask, positions, cache)

    def _prefill(self, input_ids, attention_mask, positions, cache: KVCache):
        key_is_valid = (jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool))
        if positions is None:
            positions = default_positions(input_ids, key_is_valid)
        masking = AttentionMasking(None if attention_mask is None else key_is_valid, None, self.config.sliding_window)
        hidden, layers = self.model(input_ids, positions, masking, list(zip(cache.keys, cache.values)))
        return self.logits(hidden[:, -1:]), KVCache(
            tuple(keys for keys, _ in layers), tuple(values for _, values in layers),
            kv.prompt_key_index(key_is_valid, cache.slots), jnp.int32(input_ids.shape[1]),
            (positions[:, -1] + 1).astype(jnp.int32), filled=True)

    def _extend(self, input_ids, cache: KVCache):
        if input_ids.shape[1] != 1:
            raise ValueError(f"a filled KVCache takes one new token per row, got input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        index = cache.next_index
        key_index = kv.step_key_index(cache.key_index, index)
        masking = AttentionMasking(kv.visible_keys(key_index, index, self.config.sliding_window), None, None)
        hidden, layers = self.model(input_ids, cache.next_position[:, None], masking,
                                    list(zip(cache.keys, cache.values)), write_index=index)
        return self.logits(hidden), KVCache(
            tuple(keys for keys, _ in layers), tuple(values for _, values in layers), key_index, index + 1,
            cache.next_position + 1, filled=True)


def default_positions(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """0, 1, 2, … over the real tokens, so padded and unpadded sequences get the same rotary phases."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def unstack_layers(model: Mistral, *, consume: bool = False) -> Mistral:
    """The same model in the layout decoding reads fastest: its decoder layers as a list of modules, and
    its projections stored outputs-first (`Linear.store_outputs_first`): every one of a 16-bit model
    (XLA:CPU's bfloat16 products run 2-4x faster so, at one row as at 512), in float32 those wider
    than deep (gate, up, the LM head), as float32 deep ones run faster inputs-first.

    Why: XLA:CPU copies each layer's weights out of the stacked arrays before multiplying by them
    (the dynamic slice of a scan is not fused into the matmul). Against a training step's large
    matmuls that copy is small; in a decode step, which only streams the weights once, it doubles
    the memory traffic. The new layout is one copy of the layer weights, made here once. It shares the
    other arrays with `model`, which is left as it was; with `consume` each stacked array of `model`
    is freed as soon as its layers are copied out, so the peak is the model plus its largest stacked
    array, not two models, and `model` is unusable afterwards. (`bmx.model.load(...,
    decoding_layout=True)` reads a checkpoint straight into this layout, one layer at a time.)
    """
    if isinstance(model.model.layers, nnx.List):
        return model

    def take(_path, stacked: jax.Array, layer: int) -> jax.Array:
        array = stacked[layer]
        if consume and layer == model.config.num_hidden_layers - 1:
            stacked.delete()
        return array

    return layers_as_list(model, take)


def layers_as_list(model: Mistral, take: Callable[[tuple, object, int], jax.Array]) -> Mistral:
    """`model` (concrete or abstract) in `unstack_layers`'s layout, each layer's array of a stacked
    parameter given by `take(path in the layers' state, stacked leaf, layer index)`, layer by layer
    for one parameter after another."""
    graphdef, state = nnx.split(model)
    unstacked = nnx.merge(graphdef, state)  # new modules, same arrays: `model` itself is left alone
    layer_graph, layer_state = nnx.split(unstacked.model.layers)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(layer_state)
    per_layer: list[list[jax.Array]] = [[] for _ in range(model.config.num_hidden_layers)]
    for index, (path, stacked) in enumerate(leaves):
        leaves[index] = None
        for layer, arrays in enumerate(per_layer):
            arrays.append(take(path, stacked, layer))
        del stacked
    del state, layer_state
    modules = []
    for arrays in per_layer:
        layer = nnx.merge(layer_graph, jax.tree.unflatten(treedef, arrays))
        for _, variable in nnx.iter_graph(layer):
            axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
            if axes and axes[0] == "layers":
                variable.set_metadata(logical_axes=tuple(axes[1:]))
        modules.append(layer)
        arrays.clear()
    unstacked.model.layers = nnx.List(modules)
    for _, module in nnx.iter_graph(unstacked):
        if type(module) is Linear and (jnp.dtype(module.kernel.dtype).itemsize < 4 or math.prod(
                module.kernel.shape[module.num_contracted:]) > math.prod(module.kernel.shape[:module.num_contracted])):
            module.store_outputs_first()
    return unstacked
