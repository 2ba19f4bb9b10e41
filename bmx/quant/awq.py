"""AWQ (activation-aware weight quantization), block by block, as AutoAWQ does it for Mistral.

For each decoder layer, on the float model's calibration activations:
1. per scaling group — (input_layernorm → q, k, v), (v → o, only without GQA, where v's outputs
   are o's inputs one to one), (post_attention_layernorm → gate, up), (up → down) — search
   α ∈ {0, 1/20, …, 19/20} for per-input-channel scales s = x̄^α (x̄: mean |activation|; the
   paper's formula, where α = 0 is plain round-to-nearest) or, with `duo_scaling` (AutoAWQ's
   default), s = x̄^α / (w̄^(1−α) + 1e-4) (w̄: mean group-normalised |weight|), normalised by
   √(max s · min s), minimising the squared error of the group's block output when its linears
   are fake-quantized as Q(W·s)/s;
2. fold each group's s into the preceding norm weight or linear's outputs (÷s) and into the
   group's linear inputs (×s), which leaves the float function unchanged;
3. per linear except q and k (whose errors the attention softmax amplifies), search a clipping
   threshold per output row and group — max|w| × (1 − i/20), i < 10 — minimising the error of
   its output on a subsample of 512 scaled calibration tokens, and clip;
4. round to nearest with a zero point per group (`awq_format`).

The search and the folding work on float32 copies of each layer's parameters, whatever the
model's parameter dtype: a bfloat16 model would otherwise round every candidate Q(W·s)/s to 8 bits
of mantissa (AutoAWQ works in float16). Only the result is cast back: the folded norm weights w/s
to the model's parameter dtype, the linears to the 4-bit format. The calibration activations and
block outputs are computed in the model's computation dtype; `quantize_checkpoint` loads the model
with float32 computation for AWQ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bmx.model.mistral import Mistral
from bmx.quant.awq_format import fake_quantize
from bmx.quant.calibration import LayerCalibration, layer_by_layer, layer_masking, rotary_tables
from bmx.quant.model import LINEAR_PATHS, install_quantized, linear_at
from bmx.quant.schemes import AwqScheme

GRID = 20  # α and clipping grid points, as AutoAWQ
CLIP_STEPS = 10  # shrink max|w| by up to 50%
CLIP_TOKENS = 512  # calibration tokens the clipping search looks at
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass(frozen=True)
class ScalingGroup:
    previous: str  # the norm or linear whose outputs feed `linears`; it absorbs 1/s
    linears: tuple[str, ...]  # scaled by s along their inputs, quantized
    inspected: str  # the block whose output error the search minimises


def scaling_groups(config) -> list[ScalingGroup]:
    groups = [ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    # v's outputs are o's inputs one to one only when there is one KV head per query head.
    value_shape = (config.num_key_value_heads * config.head_dim, config.hidden_size)
    output_shape = (config.hidden_size, config.num_attention_heads * config.head_dim)
    if value_shape == output_shape:
        groups.append(ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
    groups.append(ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


# ---- pure pieces ----------------------------------------------------------------------------------

def as_matrix(kernel, num_contracted: int):
    """bmx kernel `[*in, *out]` → `[in features, out features]` float32."""
    in_features = int(np.prod(kernel.shape[:num_contracted]))
    return kernel.reshape(in_features, -1).astype(jnp.float32)


def mean_abs_activation(x):
    """x̄: mean |x| per input feature over all tokens, accumulated in float32."""
    return jnp.mean(jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), axis=0)


def mean_normalised_weight(weights_hf, group_size: int):
    """w̄: per input feature, the mean over output rows of |w| / (max |w| of its group + 1e-6)."""
    weight = jnp.concatenate(weights_hf, axis=0)
    groups = jnp.abs(weight.reshape(-1, group_size))
    return (groups / (groups.max(axis=1, keepdims=True) + 1e-6)).reshape(weight.shape).mean(axis=0)


def candidate_scales(x_mean, w_mean, ratio: float, duo_scaling: bool = False):
    """s = x̄^α (the AWQ paper; α = 0 is no scaling), or x̄^α / (w̄^(1−α) + 1e-4) (AutoAWQ's
    `duo_scaling`), floored at 1e-4 and normalised by √(max s · min s)."""
    if duo_scaling:
        scales = jnp.maximum(x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4), 1e-4)
    else:
        scales = jnp.maximum(x_mean ** ratio, 1e-4)
    scales = scales / jnp.sqrt(scales.max() * scales.min())
    return jnp.where(jnp.isfinite(scales), scales, 1.0)


def scaled_fake_quantized(matrix, scales, group_size: int):
    """Q(W·s)/s for a bmx-orientation matrix `[in, out]` (s along the inputs)."""
    scaled_hf = (matrix * scales[:, None]).T
    return fake_quantize(scaled_hf, group_size).T / scales[:, None]


# ---- the block searches (jitted; one compilation per group kind and shape) ----------------------

def _inspect(layer, inspected: str, x, cos, sin, masking):
    if inspected == "self_attn":
        return layer.self_attn(x, cos, sin, masking)
    if inspected == "mlp":
        return layer.mlp(x)
    linear = linear_at(layer, inspected)
    return linear(x.reshape(*x.shape[:2], *linear.kernel.shape[:linear.num_contracted]))


@partial(jax.jit, static_argnames=("graph", "group", "masking", "group_size"))
def _group_squared_error(graph, state, group: ScalingGroup, scales, x, reference, cos, sin, masking, group_size):
    layer = nnx.merge(graph, state)
    for path in group.linears:
        linear = linear_at(layer, path)
        kernel = linear.kernel[...]
        matrix = scaled_fake_quantized(as_matrix(kernel, linear.num_contracted), scales, group_size)
        linear.kernel.value = matrix.reshape(kernel.shape).astype(kernel.dtype)
    output = _inspect(layer, group.inspected, x, cos, sin, masking)
    return jnp.sum(jnp.square(output.astype(jnp.float32) - reference.astype(jnp.float32)))


@partial(jax.jit, static_argnames=("graph", "inspected", "masking"))
def _block_output(graph, state, inspected: str, x, cos, sin, masking):
    return _inspect(nnx.merge(graph, state), inspected, x, cos, sin, masking)


def with_float32_parameters(layer: LayerCalibration) -> LayerCalibration:
    """The layer with its floating-point parameters upcast to float32 (exactly: the same values)."""
    def upcast(array):
        return array.astype(jnp.float32) if jnp.issubdtype(array.dtype, jnp.floating) else array

    return replace(layer, state=jax.tree.map(upcast, layer.state))


def scale_search_errors(layer: LayerCalibration, group: ScalingGroup, model: Mistral, group_size: int,
                        chunk: int, duo_scaling: bool = False) -> tuple[np.ndarray, list[jax.Array]]:
    """For each α on the grid, the squared error of `group`'s block output with its linears fake-quantized
    as Q(W·s)/s, and the scales s; the candidates are float32 whatever the layer's parameter dtype."""
    layer = with_float32_parameters(layer)
    module = nnx.merge(layer.graph, layer.state)
    x = layer.input_of(group.linears[0])  # [sequences, seq, in features]
    x_mean = mean_abs_activation(x)
    weights_hf = []
    for path in group.linears:
        linear = linear_at(module, path)
        weights_hf.append(as_matrix(linear.kernel[...], linear.num_contracted).T)
    w_mean = mean_normalised_weight(weights_hf, group_size)
    masking = layer_masking(model)
    chunks = [x[i:i + chunk] for i in range(0, x.shape[0], chunk)]
    tables = [rotary_tables(model, *piece.shape[:2]) for piece in chunks]
    references = [_block_output(layer.graph, layer.state, group.inspected, piece, cos, sin, masking)
                  for piece, (cos, sin) in zip(chunks, tables)]
    errors, candidates = [], []
    for step in range(GRID):
        scales = candidate_scales(x_mean, w_mean, step / GRID, duo_scaling)
        errors.append(sum(float(_group_squared_error(layer.graph, layer.state, group, scales, piece, reference, cos,
                                                     sin, masking, group_size))
                          for piece, reference, (cos, sin) in zip(chunks, references, tables)))
        candidates.append(scales)
    return np.array(errors), candidates


def search_scales(layer: LayerCalibration, group: ScalingGroup, model: Mistral, group_size: int,
                  chunk: int, duo_scaling: bool = False) -> tuple[jax.Array, float]:
    """The best per-input-channel scales of `group` and the α that gave them (the first of equals)."""
    errors, candidates = scale_search_errors(layer, group, model, group_size, chunk, duo_scaling)
    best = int(np.argmin(np.nan_to_num(errors, nan=np.inf)))
    return candidates[best], best / GRID


@partial(jax.jit, static_argnames=("group_size",))
def _best_clip_rows(weight_hf, x, group_size: int):
    """Per row and group of `weight_hf` `[rows, in]`, the clipped max|w| with the least output error."""
    rows, in_features = weight_hf.shape
    w = weight_hf.reshape(rows, in_features // group_size, group_size)
    x = x.reshape(x.shape[0], in_features // group_size, group_size)
    original = jnp.einsum("tgk,ogk->otg", x, w)
    original_max = jnp.abs(w).max(axis=-1)  # [rows, groups]
    best_error = jnp.full(original_max.shape, jnp.inf)
    best_max = original_max
    for step in range(CLIP_STEPS):
        max_val = original_max * (1 - step / GRID)
        clipped = jnp.clip(w, -max_val[..., None], max_val[..., None])
        quantized = fake_quantize(clipped.reshape(rows, in_features), group_size).reshape(w.shape)
        error = jnp.mean(jnp.square(jnp.einsum("tgk,ogk->otg", x, quantized) - original), axis=1)
        better = error < best_error
        best_error = jnp.where(better, error, best_error)
        best_max = jnp.where(better, max_val, best_max)
    return best_max


def clip_weight(weight_hf, x, group_size: int, row_batch: int = 256):
    """The weight `[out, in]` clipped per row and group at the searched thresholds."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    x = x[::max(1, x.shape[0] // CLIP_TOKENS)]
    rows, in_features = weight_hf.shape
    row_batch = row_batch if rows % row_batch == 0 else (64 if rows % 64 == 0 else rows)
    best_max = jnp.concatenate([_best_clip_rows(weight_hf[i:i + row_batch], x, group_size)
                                for i in range(0, rows, row_batch)])
    limit = jnp.repeat(best_max, group_size, axis=1)
    return jnp.clip(weight_hf, -limit, limit)


# ---- one layer, then the model ------------------------------------------------------------------

def layer_matrices(layer: LayerCalibration) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The layer's linears as float32 `[in, out]` matrices and its two norm weights."""
    module = nnx.merge(layer.graph, layer.state)
    matrices = {}
    for path in LINEAR_PATHS:
        linear = linear_at(module, path)
        matrices[path] = as_matrix(linear.kernel[...], linear.num_contracted)
    norms = {name: getattr(module, name).weight[...].astype(jnp.float32)
             for name in ("input_layernorm", "post_attention_layernorm")}
    return matrices, norms


def fold_scales(matrices: dict, norms: dict, groups: list[ScalingGroup], scales: list) -> tuple[dict, dict]:
    """Divide each group's preceding norm weight or linear outputs by s and multiply its linears' inputs
    by s: the float layer computes the same function, and the linears see rescaled input channels."""
    matrices, norms = dict(matrices), dict(norms)
    for group, group_scales in zip(groups, scales):
        if group.previous in norms:
            norms[group.previous] = norms[group.previous] / group_scales
        else:
            matrices[group.previous] = matrices[group.previous] / group_scales[None, :]
        for path in group.linears:
            matrices[path] = matrices[path] * group_scales[:, None]
    return matrices, norms


def awq_layer(layer: LayerCalibration, model: Mistral, group_size: int, chunk: int = 8, duo_scaling: bool = False):
    """Scaled and clipped float32 matrices `[in, out]` per linear, float32 norm weights, and the chosen α."""
    groups = scaling_groups(model.config)
    searched = [search_scales(layer, group, model, group_size, chunk, duo_scaling) for group in groups]
    scales = [group_scales for group_scales, _ in searched]
    matrices, norms = fold_scales(*layer_matrices(layer), groups, scales)
    inputs = {path: layer.input_of(path).astype(jnp.float32) for path in LINEAR_PATHS}
    for group, group_scales in zip(groups, scales):
        for path in group.linears:
            inputs[path] = inputs[path] / group_scales  # what the scaled linear will see
    for path in LINEAR_PATHS:
        if path not in NO_CLIP:
            matrices[path] = clip_weight(matrices[path].T, inputs[path], group_size).T
    ratios = {group.previous: ratio for group, (_, ratio) in zip(groups, searched)}
    return matrices, norms, ratios


def awq_quantize(model: Mistral, tokens: np.ndarray, scheme: AwqScheme, *, chunk: int = 8,
                 duo_scaling: bool = False, progress: bool = True) -> Mistral:
    """Quantize the float `model` in place with AWQ on calibration `tokens` `[sequences, seq]`.

    `duo_scaling`: AutoAWQ's default scale formula instead of the paper's (see `candidate_scales`).
    """
    quantized: dict[str, list] = {path: [] for path in LINEAR_PATHS}
    norms: dict[str, list] = {"input_layernorm": [], "post_attention_layernorm": []}
    bar = tqdm(layer_by_layer(model, tokens, chunk), total=model.config.num_hidden_layers, desc="awq",
               unit="layer", disable=not progress)
    for layer in bar:
        matrices, layer_norms, ratios = awq_layer(layer, model, scheme.group_size, chunk, duo_scaling)
        bar.set_postfix({name.split(".")[-1]: f"α={ratio:.2f}" for name, ratio in ratios.items()})
        for path, matrix in matrices.items():
            quantized[path].append(scheme.quantize(np.asarray(matrix).T))
        for name, weight in layer_norms.items():
            norms[name].append(weight)
    for name, weights in norms.items():
        norm = getattr(model.model.layers, name)
        norm.weight.value = jnp.stack(weights).astype(norm.weight[...].dtype)
    install_quantized(model, scheme, quantized)
    return model
