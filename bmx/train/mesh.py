"""The device mesh (`data`, `fsdp`, `tensor`) and the one table from logical axes to mesh axes.

Changing the parallelism is changing `MeshConfig`: the sizes, and if needed the rules. With the
default rules, parameters and optimizer state are split over `fsdp` along `embed` (ZeRO-3 style)
and over `tensor` along heads, MLP and vocabulary (Megatron style); batches over `data` × `fsdp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bmx.model.sharding import MeshAxes, logical_to_spec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, MeshAxes] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    # activations
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_mlp": "tensor",
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
}


@dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: every device not used by the other axes
    tensor: int = 1
    rules: dict[str, MeshAxes] = field(default_factory=dict)  # overrides of DEFAULT_RULES


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [config.data, config.fsdp, config.tensor]
    if sum(size == -1 for size in sizes) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={config.data} fsdp={config.fsdp} tensor={config.tensor}")
    known = math.prod(size for size in sizes if size != -1)
    if any(size == 0 or size < -1 for size in sizes) or num_devices % known:
        raise ValueError(f"mesh data={config.data} fsdp={config.fsdp} tensor={config.tensor} does not fit "
                         f"{num_devices} devices")
    sizes = [num_devices // known if size == -1 else size for size in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    try:  # topology-aware placement on TPU/GPU; plain reshape elsewhere
        device_grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU and odd device counts have no topology to exploit
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES)


def rules_for(config: MeshConfig) -> dict[str, MeshAxes]:
    unknown = sorted(set(config.rules) - set(DEFAULT_RULES))
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axes {unknown}; known: {sorted(DEFAULT_RULES)}")
    for name, target in config.rules.items():
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if set(targets) - set(MESH_AXES):
            raise ValueError(f"mesh.rules.{name}: {target!r} names an axis outside {MESH_AXES}")
    return {**DEFAULT_RULES, **config.rules}


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """A NamedSharding for every parameter, from its `logical_axes` metadata.

    Variables that are not parameters (LoRA's dropout keys) carry no axes and are replicated.
    """
    def sharding(variable):
        if not isinstance(variable, nnx.Param) and "logical_axes" not in variable.get_metadata():
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(variable.get_metadata()["logical_axes"], rules))

    return jax.tree.map(sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Rows of a `[batch, seq]` array over the batch axes, sequence unsplit."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
