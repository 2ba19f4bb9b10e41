"""`make_mesh` lays the mesh along the hardware: the reference is `jax.experimental.mesh_utils` itself, on
libtpu's compile-only devices of real slice shapes (no TPU needed), and plain reshape on CPU."""

import jax
import numpy as np
import pytest

from bmx.train.aot_hardware import compile_only_devices, libtpu_available, parse_topology
from bmx.train.mesh import MeshConfig, make_mesh

needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason='libtpu not installed: pip install "jax[tpu]"')


def ids(grid) -> np.ndarray:
    return np.vectorize(lambda device: device.id)(grid)


@needs_libtpu
@pytest.mark.parametrize("topology, config, shape", [
    ("v5p:4x4x4", MeshConfig(fsdp=16, tensor=4), (1, 16, 4)),  # v5p-128
    ("v5e:16x16", MeshConfig(fsdp=16, tensor=16), (1, 16, 16)),  # v5e-256
    ("v5e:16x16", MeshConfig(data=16, fsdp=-1), (16, 16, 1)),
])
def test_tpu_mesh_is_the_one_mesh_utils_lays_on_the_torus(topology, config, shape):
    from jax.experimental import mesh_utils

    devices = compile_only_devices(parse_topology(topology))
    mesh = make_mesh(config, devices)
    assert tuple(mesh.shape.values()) == shape
    np.testing.assert_array_equal(ids(mesh.devices), ids(mesh_utils.create_device_mesh(shape, devices)))


@needs_libtpu
def test_tpu_mesh_is_not_the_order_devices_are_listed_in():
    """The bug this guards against: every run used to take the reshape fallback."""
    devices = compile_only_devices(parse_topology("v5p:4x4x4"))
    mesh = make_mesh(MeshConfig(fsdp=16, tensor=4), devices)
    assert not np.array_equal(ids(mesh.devices), ids(np.asarray(devices).reshape(1, 16, 4)))
    # The tensor axis runs along one physical axis of the torus: its 4 chips are neighbours.
    for row in mesh.devices[0]:
        coords = np.array([device.coords for device in row])
        assert sum(len(set(column)) > 1 for column in coords.T) == 1


@needs_libtpu
def test_an_axis_that_splits_a_physical_axis_is_laid_out_as_jax_make_mesh_does():
    from jax.experimental import mesh_utils

    devices = compile_only_devices(parse_topology("v5p:4x4x4"))
    mesh = make_mesh(MeshConfig(fsdp=32, tensor=2), devices)
    expected = mesh_utils.create_device_mesh((1, 32, 2), devices, allow_split_physical_axes=True)
    np.testing.assert_array_equal(ids(mesh.devices), ids(expected))


@needs_libtpu
def test_devices_that_are_not_a_slice_are_a_clear_error():
    devices = compile_only_devices(parse_topology("v5p:2x2x1"))[:3]
    with pytest.raises(ValueError, match=r"cannot be laid out on these 3 TPU v5 devices"):
        make_mesh(MeshConfig(fsdp=3), devices)


@needs_libtpu
def test_two_slices_put_data_across_slices_and_fsdp_inside_one():
    from jax.experimental import mesh_utils

    devices = compile_only_devices(parse_topology("v5e:4x4", slices=2))
    mesh = make_mesh(MeshConfig(), devices)  # dcn_data -1: across every slice
    assert dict(mesh.shape) == {"data": 2, "fsdp": 16, "tensor": 1}
    slice_of = np.vectorize(lambda device: device.slice_index)(mesh.devices)
    assert [set(slice_of[row].flat) for row in range(2)] == [{0}, {1}]
    expected = mesh_utils.create_hybrid_device_mesh((1, 16, 1), (2, 1, 1), devices)
    np.testing.assert_array_equal(ids(mesh.devices), ids(expected))
    with pytest.raises(ValueError, match="dcn_data=3 dcn_fsdp=1 does not fit the 2 slices"):
        make_mesh(MeshConfig(dcn_data=3), devices)


def test_cpu_devices_are_reshaped_in_the_order_they_are_listed():
    devices = jax.devices("cpu")[:8]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    np.testing.assert_array_equal(ids(mesh.devices), np.arange(8).reshape(2, 2, 2) + devices[0].id)
