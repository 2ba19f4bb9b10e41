"""The device mesh (`data`, `fsdp`, `tensor`) and the one table from logical axes to mesh axes.

Changing the parallelism is changing `MeshConfig`: the sizes, and if needed the rules. With the
default rules, parameters and optimizer state are split over `fsdp` along `embed` (ZeRO-3 style)
and over `tensor` along heads, MLP and vocabulary (Megatron style); batches over `data` × `fsdp`.

Placement follows the hardware: on TPU and GPU, `jax.experimental.mesh_utils` lays each axis along
the torus or NVLink domain, so that `tensor` and `fsdp` collectives run between neighbours; only CPU
devices (no topology) are reshaped in the order they are listed. Several TPU slices (devices with
distinct `slice_index`), or GPU nodes when `dcn_data`/`dcn_fsdp` ask for them, make a hybrid mesh:
`data`, `fsdp` and `tensor` give the split inside a slice (ICI), `dcn_data` × `dcn_fsdp` the split
across slices (DCN), and each mesh axis is the product of the two, as MaxText's `ici_*`/`dcn_*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.experimental import mesh_utils
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
    data: int = 1  # inside one slice (all devices when there is one slice)
    fsdp: int = -1  # -1: every device of a slice not used by the other axes
    tensor: int = 1
    dcn_data: int = -1  # slices (TPU) or nodes (GPU) across which `data` runs; -1: those not used by dcn_fsdp
    dcn_fsdp: int = 1
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


def num_slices(devices) -> int:
    """TPU slices among `devices` (distinct `slice_index`); 1 for a single slice, GPUs and CPUs."""
    return len({getattr(device, "slice_index", None) or 0 for device in devices})


def _granules(config: MeshConfig, devices) -> tuple[int, bool]:
    """(how many DCN-connected groups the devices form, whether a group is a process rather than a slice).

    TPU slices announce themselves; GPU nodes do not, so a GPU mesh is hybrid only when the config asks
    for it (`dcn_data`/`dcn_fsdp` > 1), one node per process, as `launch/slurm_gpu.sbatch` runs them."""
    slices = num_slices(devices)
    if slices > 1 or devices[0].platform != "gpu" or max(config.dcn_data, config.dcn_fsdp) <= 1:
        return slices, False
    return len({device.process_index for device in devices}), True


def hybrid_shapes(config: MeshConfig, num_devices: int, granules: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(per-slice ICI shape, across-slice DCN shape) of the (data, fsdp, tensor) mesh."""
    dcn = MeshConfig(data=config.dcn_data, fsdp=config.dcn_fsdp, tensor=1)
    try:
        dcn_shape = mesh_shape(dcn, granules)
    except ValueError:
        raise ValueError(f"mesh dcn_data={config.dcn_data} dcn_fsdp={config.dcn_fsdp} does not fit the "
                         f"{granules} slices (or nodes) of these devices") from None
    return mesh_shape(config, num_devices // granules), dcn_shape


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    granules, process_is_granule = _granules(config, devices)
    ici_shape, dcn_shape = hybrid_shapes(config, len(devices), granules)
    shape = tuple(ici * dcn for ici, dcn in zip(ici_shape, dcn_shape))
    if devices[0].platform == "cpu":  # no topology to follow: devices in the order they are listed
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    return Mesh(_device_grid(ici_shape, dcn_shape, devices, process_is_granule), MESH_AXES)


def _device_grid(ici_shape, dcn_shape, devices, process_is_granule: bool) -> np.ndarray:
    """mesh_utils' placement; axes that do not map onto whole physical axes are split as `jax.make_mesh`
    does, and a shape that cannot be laid out at all is an error naming it."""
    def create(allow_split: bool) -> np.ndarray:
        if math.prod(dcn_shape) > 1:
            return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                        process_is_granule=process_is_granule,
                                                        allow_split_physical_axes=allow_split)
        return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=allow_split)

    for allow_split in (False, True):
        try:
            return create(allow_split)
        except NotImplementedError as error:  # e.g. tensor=2 on a 4x4x4 torus: an axis of 4 split in two
            failure = error
        except (ValueError, AssertionError) as error:  # e.g. devices that are not a whole slice
            failure = error
            break
    reason = str(failure).splitlines()[0][:300] if str(failure) else type(failure).__name__
    raise ValueError(f"mesh {dict(zip(MESH_AXES, ici_shape))} per slice x {dict(zip(MESH_AXES, dcn_shape))} "
                     f"across slices cannot be laid out on these {len(devices)} {devices[0].device_kind} "
                     f"devices: {reason}")


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
