"""Collective accounting (`bmx.train.aot_comms`): what a compiled program moves, over which axes and links.

References: byte counts done by hand for programs small enough to count, numpy for the replica-group
notations, and the placement of the devices (their slice and torus coordinates) for the links.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bmx.train.aot_comms import CommModel, dcn_wire_bytes, parse_collectives, wire_bytes
from bmx.train.aot_hardware import CHIPS, compile_only_devices, libtpu_available, parse_topology
from bmx.train.mesh import MeshConfig, make_mesh

needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason='libtpu not installed: pip install "jax[tpu]"')
MiB = 2**20


def test_replica_groups_in_both_notations_and_one_entry_per_chain():
    text = "\n".join([
        # iota notation: arange(8).reshape(4, 2).T cut into 2 groups of 4
        "%all-reduce.1 = f32[256]{0} all-reduce(%p), channel_id=3, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add",
        "%all-gather.2 = bf16[8,64]{1,0} all-gather(%q), channel_id=4, replica_groups={{0,1},{2,3}}, dimensions={0}",
        # the second and third pieces of XLA:TPU's async chain share the channel: one collective
        '%all-gather.3 = bf16[8,64]{1,0} all-gather(%r), channel_id=4, replica_groups={{0,1},{2,3}}, '
        'backend_config={"async_collective_fusion_config":{}}',
        "%collective-permute.5 = f32[16]{0} collective-permute(%s), channel_id=7, source_target_pairs={{0,1},{1,0}}",
        "%all-gather-start.6 = (f32[4]{0}, f32[16]{0}) all-gather-start(%t), channel_id=8, replica_groups={}",
        '%send.9 = (bf16[3,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) send(%x, %after-all), channel_id=22, '
        'is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-reduce.107_0",'
        '_xla_megascale_target="{1,2}x{0:15}",_xla_megascale_transfer_type="ALL_REDUCE"}',
    ])
    found = {c.name: c for c in parse_collectives(text)}
    assert set(found) == {"all-reduce.1", "all-gather.2", "collective-permute.5", "all-gather-start.6", "all-reduce.107_0"}
    assert found["all-reduce.1"].groups == ((0, 2, 4, 6), (1, 3, 5, 7)) and found["all-reduce.1"].result_bytes == 1024
    assert found["all-gather.2"].groups == ((0, 1), (2, 3)) and found["all-gather.2"].result_bytes == 8 * 64 * 2
    assert found["collective-permute.5"].groups == ((0, 1), (1, 0))
    start = found["all-gather-start.6"]
    assert start.result_bytes == 64 and start.asynchronous and start.groups == ()  # the gathered f32[16]
    dcn = found["all-reduce.107_0"]
    assert dcn.kind == "dcn-all-reduce" and dcn.crosses_slices and dcn.result_bytes == 3 * 8 * 128 * 2
    assert dcn.groups == ((0, 1),)  # two slices


def test_ring_bytes_of_each_kind():
    # 4 devices; S the result on one device
    assert wire_bytes("all-gather", 1024, 4) == 768  # receives the 3 pieces it lacks
    assert wire_bytes("reduce-scatter", 256, 4) == 768  # sends 3 partial pieces of its 256-byte result
    assert wire_bytes("all-reduce", 1024, 4) == 1536  # a reduce-scatter then an all-gather
    assert wire_bytes("all-to-all", 1024, 4) == 768
    assert wire_bytes("collective-permute", 1024, 2) == 1024
    assert wire_bytes("all-reduce", 1024, 1) == 0
    assert dcn_wire_bytes("dcn-all-reduce", 1000, 2) == 1000
    assert dcn_wire_bytes("dcn-all-gather", 1000, 4) == 3000


@needs_libtpu
def test_a_small_compiled_program_moves_the_bytes_counted_by_hand():
    """On v5p:2x2x1 (4 chips, a 2 × 2 square without wraparound), fsdp over all 4: gathering a float32
    [1024, 256] array sharded by rows moves 3/4 of its 1 MiB into each chip over 2 axes × 2 links × half
    (no wraparound) × 100 GB/s; summing its rows all-reduces 256 floats."""
    topology = parse_topology("v5p:2x2x1")
    mesh = make_mesh(MeshConfig(fsdp=4), compile_only_devices(topology))
    rows, replicated = NamedSharding(mesh, PartitionSpec("fsdp")), NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=rows)
    model = CommModel(CHIPS["v5p"], mesh, topology.torus_axes)

    gather = jax.jit(lambda a: a * 2, out_shardings=replicated).lower(x).compile().as_text()
    (collective,) = parse_collectives(gather)
    assert collective.kind == "all-gather" and collective.result_bytes == MiB
    assert model.mesh_axes(collective) == ("fsdp",)
    assert model.seconds(collective) == pytest.approx(0.75 * MiB / (2 * 2 * 0.5 * 100e9))

    row_sum = jax.jit(lambda a: a.sum(0), out_shardings=replicated).lower(x).compile().as_text()
    reductions = [c for c in parse_collectives(row_sum)]
    assert [(c.kind, c.result_bytes) for c in reductions] == [("all-reduce", 256 * 4)]
    assert model.time(row_sum).ici == pytest.approx(2 * 0.75 * 1024 / (2 * 2 * 0.5 * 100e9))


@needs_libtpu
def test_on_two_slices_only_the_gradient_reduction_crosses_the_dcn():
    """A 1-layer step on 2 × v5e:2x2: data parallel across the slices, FSDP inside. Every transfer between
    slices is an all-reduce over `data`, at most the size of the float32 gradients of one chip's shard; no
    collective inside a slice spans `data`."""
    from bmx.config_io import from_dict
    from bmx.train.aot_compile import aot_run_config, compile_report
    from bmx.train.config import RunConfig

    small = {"preset": "tiny", "remat": "full", "attention": "xla",
             "overrides": {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                           "sliding_window": 64, "vocab_size": 512}}
    config = aot_run_config(from_dict(RunConfig, {"model": small, "train": {"seq_len": 256, "global_batch_size": 8}}))
    report = compile_report(config, parse_topology("v5e:2x2", slices=2), with_cost=False)
    assert report.fits and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    across = [row for row in report.collectives if row.link == "DCN"]
    inside = [row for row in report.collectives if row.link == "ICI"]
    assert across and {(row.kind, row.mesh_axes) for row in across} == {("dcn-all-reduce", ("data",))}
    assert inside and all("data" not in row.mesh_axes for row in inside)

    from bmx.model.config import preset

    parameters = sum(math.prod(shape) for shape in _parameter_shapes(preset("tiny", **small["overrides"])))
    assert sum(row.result_bytes for row in across) <= 1.5 * parameters * 4 / 4  # float32 gradients over fsdp=4


def _parameter_shapes(model_config):
    from flax import nnx

    from bmx.model.mistral import Mistral

    state = nnx.state(nnx.eval_shape(lambda: Mistral(model_config, rngs=nnx.Rngs(0))), nnx.Param)
    return [leaf.shape for leaf in jax.tree.leaves(state)]
