"""Quantizing a whole `Mistral`: every decoder-layer linear becomes a `QuantizedLinear`.

The seven projections of each decoder layer (q, k, v, o, gate, up, down) are quantized, as
bitsandbytes and AutoAWQ do; the embedding, the norms and the LM head stay in their float dtype.
The layers are stacked, so each quantized linear holds its arrays with a leading `layers` axis.
"""

from __future__ import annotations

from functools import partial
from math import prod
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bmx.convert.contiguous import contiguous_copy
from bmx.model.mistral import Mistral
from bmx.quant.int8 import pad_outliers
from bmx.quant.layers import QuantizedLinear
from bmx.quant.schemes import Scheme

LINEAR_PATHS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def parent_and_name(module: nnx.Module, path: str) -> tuple[nnx.Module, str]:
    *parents, name = path.split(".")
    for key in parents:
        module = getattr(module, key)
    return module, name


def linear_at(layers: nnx.Module, path: str):
    parent, name = parent_and_name(layers, path)
    return getattr(parent, name)


def kernel_to_hf(kernel: np.ndarray, num_contracted: int) -> np.ndarray:
    """bmx kernel `[*in_shape, *out_shape]` → transformers' `[out, in]` (the layout quantizers use)."""
    in_features = prod(kernel.shape[:num_contracted])
    return np.asarray(kernel).reshape(in_features, -1).T


def is_quantized(model: Mistral) -> bool:
    return any(isinstance(linear_at(model.model.layers, path), QuantizedLinear) for path in LINEAR_PATHS)


def quantize_model(model: Mistral, scheme: Scheme, *,
                   extra_args: Callable[[int, str], dict] | None = None, progress: bool = True) -> Mistral:
    """Replace the decoder linears of the float `model` by `QuantizedLinear`s, in place; returns it.

    `extra_args(layer, path)` gives per-linear keyword arguments to `scheme.quantize` (the int8
    outlier columns).
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    layers = model.model.layers
    quantized: dict[str, list[dict]] = {path: [] for path in LINEAR_PATHS}
    for layer in tqdm(range(model.config.num_hidden_layers), desc=f"quantize {scheme.method}", unit="layer",
                      disable=not progress):
        for path in LINEAR_PATHS:
            linear = linear_at(layers, path)
            weight = contiguous_copy(kernel_to_hf(np.asarray(linear.kernel[...][layer]), linear.num_contracted))
            kwargs = extra_args(layer, path) if extra_args else {}
            quantized[path].append(scheme.quantize(weight, **kwargs))
    install_quantized(model, scheme, quantized)
    return model


def quantize_abstractly(model: Mistral, scheme: Scheme) -> Mistral:
    """Under `nnx.eval_shape`: swap the decoder linears for `QuantizedLinear`s of the right shapes and
    dtypes without quantizing anything (the trainer plans QLoRA's shardings before loading weights).
    One layer's array shapes come from quantizing a matrix of ones of that layer's weight shape."""
    layers = model.model.layers
    for path in LINEAR_PATHS:
        linear = linear_at(layers, path)
        kernel_shape = linear.kernel.shape[1:]  # without the layers axis
        in_shape, out_shape = kernel_shape[:linear.num_contracted], kernel_shape[linear.num_contracted:]
        one_layer = scheme.quantize(np.ones((prod(out_shape), prod(in_shape)), np.float32))
        stacked = {name: jnp.zeros((linear.kernel.shape[0], *value.shape), value.dtype)
                   for name, value in one_layer.items()}
        parent, name = parent_and_name(layers, path)
        setattr(parent, name, QuantizedLinear(scheme, stacked, in_shape, out_shape, dtype=linear.dtype,
                                              leading_axes=("layers",)))
    return model


def install_quantized(model: Mistral, scheme: Scheme, quantized: dict[str, list[dict[str, np.ndarray]]]) -> None:
    """Swap each float linear for a `QuantizedLinear` holding its per-layer arrays, stacked."""
    layers = model.model.layers
    for path in LINEAR_PATHS:
        linear = linear_at(layers, path)
        per_layer = quantized[path]
        if "outlier_columns" in per_layer[0]:
            count = max(arrays["outlier_columns"].size for arrays in per_layer)
            if count == 0:  # no layer has an outlier feature here: plain int8
                per_layer = [{k: v for k, v in arrays.items() if not k.startswith("outlier_")} for arrays in per_layer]
            else:
                per_layer = [pad_outliers(arrays, count) for arrays in per_layer]
        stacked = {name: np.stack([arrays[name] for arrays in per_layer]) for name in per_layer[0]}
        kernel_shape = linear.kernel.shape[1:]  # without the layers axis
        in_shape, out_shape = kernel_shape[:linear.num_contracted], kernel_shape[linear.num_contracted:]
        parent, name = parent_and_name(layers, path)
        setattr(parent, name, QuantizedLinear(scheme, stacked, in_shape, out_shape, dtype=linear.dtype,
                                              leading_axes=("layers",)))


def dequantized_kernels(model: Mistral) -> dict[str, jax.Array]:
    """The float kernels `[layers, *in, *out]` the quantized linears stand for, by path."""
    kernels = {}
    for path in LINEAR_PATHS:
        linear = linear_at(model.model.layers, path)
        graph, state = nnx.split(linear)
        kernels[path] = jax.vmap(partial(_dequantized_kernel, graph))(state)
    return kernels


def _dequantized_kernel(graph, layer_state) -> jax.Array:
    return nnx.merge(graph, layer_state).dequantized_kernel()


def dequantize_model(model: Mistral) -> Mistral:
    """A float `Mistral` whose linears hold the dequantized kernels (in the computation dtype)."""
    params = nnx.state(model, nnx.Param).to_pure_dict()  # the float parameters: embedding, norms, head
    for path, kernel in dequantized_kernels(model).items():
        node = params["model"]["layers"]
        for key in path.split("."):
            node = node.setdefault(key, {})
        node["kernel"] = kernel
    config, compute_dtype = model.config, linear_at(model.model.layers, LINEAR_PATHS[0]).dtype
    param_dtype = model.model.embed_tokens.weight[...].dtype
    abstract = nnx.eval_shape(lambda: Mistral(config, dtype=compute_dtype, param_dtype=param_dtype,
                                              remat=model.model.remat))
    graph, state = nnx.split(abstract)
    state.replace_by_pure_dict(params)
    return nnx.merge(graph, state)


def parameter_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (what it occupies in device memory)."""
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(nnx.state(model)))
