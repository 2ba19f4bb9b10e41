"""`python -m bmx.train.aot`: the train step compiled for TPU slices from this CPU, with libtpu.

References: the byte sizes of the step's arguments from their shapes and shardings, bmx's FLOP formula
(an independent count, `bmx.train.flops`) against XLA's cost analysis, XLA's own out-of-memory verdict,
and a fully unrolled compile against the extrapolated cost.
"""

import json
import math

import jax
import numpy as np
import pytest

from conftest import FULL_TESTS

from bmx.config_io import from_dict
from bmx.train.aot_hardware import CHIPS, libtpu_available, parse_topology
from bmx.train.config import RunConfig

pytestmark = pytest.mark.skipif(not libtpu_available(), reason='libtpu not installed: pip install "jax[tpu]"')

TINY = {"preset": "tiny", "overrides": {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                                        "sliding_window": 64}}


def tiny_config(model=None, **train) -> RunConfig:
    return from_dict(RunConfig, {"model": {**TINY, **(model or {})},
                                 "train": {"seq_len": 256, "global_batch_size": 8, **train}})


@pytest.fixture(scope="module")
def v5p_report():
    """The tiny model's step on a v5p:2x2x1 slice (4 chips), default attention (splash on TPU), full remat."""
    from bmx.train.aot_compile import compile_report

    return compile_report(tiny_config({"remat": "full"}), parse_topology("v5p:2x2x1"))


def shard_bytes(abstract_tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def test_tiny_step_compiles_for_v5p_with_the_splash_kernel(v5p_report):
    report = v5p_report
    assert (report.topology, report.num_devices, report.chip.name) == ("v5p:2x2x1", 4, "TPU v5p")
    assert report.chip.hbm_bytes == 95 * 2**30
    assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report.attention == "splash" and report.remat == "full"
    assert report.fits and report.compile_error == ""
    assert report.microbatch_per_device == 2


def test_report_memory_is_per_device_and_counts_every_argument(v5p_report):
    from bmx.train.aot_compile import aot_run_config, step_arguments
    from bmx.train.aot_hardware import compile_only_devices
    from bmx.train.setup import build

    config = aot_run_config(tiny_config({"remat": "full"}))
    setup = build(config, compile_only_devices(parse_topology("v5p:2x2x1")))
    arguments = shard_bytes(step_arguments(setup, config))  # one device's shards of params, Adam, batch
    memory = v5p_report.memory
    # TPU tiles pad small minor dimensions (here 64 → 128), so XLA's sizes are at least the raw ones.
    assert arguments <= memory.arguments <= 4 * arguments
    # Donation: the new parameters and optimizer state are written over the old ones.
    assert memory.aliased >= shard_bytes((setup.trainable.abstract_params, setup.abstract_opt_state))
    assert memory.total == memory.arguments + memory.outputs - memory.aliased + memory.temporaries + memory.code
    assert memory.temporaries > 0 and memory.total < v5p_report.chip.hbm_bytes


def test_report_names_the_largest_buffers_with_their_jax_operations(v5p_report):
    buffers = v5p_report.largest_buffers
    assert len(buffers) == 8
    assert [b.size_bytes for b in buffers] == sorted((b.size_bytes for b in buffers), reverse=True)
    # The largest is a [tokens, vocab] float32 block of logits: 8 × 256 tokens over 4 devices.
    assert buffers[0].shape == "f32[512,32000]" and "dot_general" in buffers[0].op_name


def test_report_flops_and_roofline(v5p_report):
    from bmx.model.config import preset
    from bmx.train.flops import training_flops_per_token

    report = v5p_report
    model_config = preset("tiny", **TINY["overrides"])
    assert report.model_flops == pytest.approx(training_flops_per_token(model_config, 256) * 8 * 256 / 4)
    # Rematerialisation adds work; XLA also counts softmax, norms and the optimizer.
    assert report.model_flops < report.xla_cost.flops < 1.6 * report.model_flops
    chip = CHIPS["v5p"]
    assert report.compute_seconds == pytest.approx(report.xla_cost.flops / (chip.peak_flops * chip.matmul_efficiency))
    assert report.memory_seconds == pytest.approx(report.xla_cost.bytes_accessed / chip.hbm_bandwidth)
    # One slice of 4 chips: FSDP all-gathers and gradient reductions over ICI, nothing over DCN.
    assert report.ici_seconds > 0 and report.dcn_seconds == 0
    roofline = max(report.compute_seconds, report.memory_seconds)
    hidden, exposed = report.step_seconds_range
    assert hidden == max(roofline, report.ici_seconds) and exposed == pytest.approx(roofline + report.ici_seconds)
    assert hidden <= report.step_seconds <= exposed
    low, high = report.predicted_mfu_range
    assert 0 < low <= report.predicted_mfu <= high < 1
    assert high == pytest.approx(report.model_flops / (hidden * chip.peak_flops))
    assert report.tokens_per_second == pytest.approx(8 * 256 / report.step_seconds)
    assert {row.link for row in report.collectives} == {"ICI"}
    assert {row.mesh_axes for row in report.collectives} == {("fsdp",)}


def test_xla_counts_the_flops_of_bmx_formula_when_nothing_is_recomputed():
    """Without remat and with attention short next to the matmuls, XLA's count is bmx's MFU formula."""
    from bmx.model.config import preset
    from bmx.train.aot_compile import aot_run_config, xla_step_cost
    from bmx.train.aot_hardware import compile_only_devices
    from bmx.train.flops import training_flops_per_token

    shape = {"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 1024, "vocab_size": 512,
             "sliding_window": None}
    config = aot_run_config(from_dict(RunConfig, {"model": {"preset": "tiny", "overrides": shape, "remat": "none",
                                                            "attention": "xla"},
                                                  "train": {"seq_len": 64, "global_batch_size": 8}}))
    cost = xla_step_cost(config, compile_only_devices(parse_topology("v5p:2x2x1")), num_layers=1)
    formula = training_flops_per_token(preset("tiny", **shape), 64) * 8 * 64 / 4
    # XLA multiplies the whole causal score matrix (~2 % here) and counts elementwise work.
    assert formula <= cost.flops <= 1.06 * formula


def test_extrapolated_cost_equals_a_fully_unrolled_compile():
    """Costs measured at 1-2 layers and 1-2 microbatches, extended to (3 layers, 3 microbatches), against XLA on
    the whole unrolled step. FLOPs need no compile; HBM bytes (a TPU compile per point) only with BMX_FULL_TESTS=1."""
    from bmx.train.aot_compile import _variant, aot_run_config, step_arguments, xla_step_cost
    from bmx.train.aot_cost import unrolled_xla_cost
    from bmx.train.aot_hardware import compile_only_devices
    from bmx.train.setup import build

    devices = compile_only_devices(parse_topology("v5p:2x2x1"))
    small = {"remat": "full", "attention": "xla", "overrides": {**TINY["overrides"], "vocab_size": 512}}
    config = aot_run_config(tiny_config(small, global_batch_size=24, grad_accumulation=3))
    config = _variant(config, layers=3, microbatches=3)
    setup = build(config, devices)
    direct = unrolled_xla_cost(setup.train_step, step_arguments(setup, config), with_bytes=FULL_TESTS)
    extrapolated = xla_step_cost(config, devices, num_layers=3, with_bytes=FULL_TESTS)
    assert extrapolated.flops == pytest.approx(direct.flops, rel=1e-4)
    assert extrapolated.bytes_accessed == pytest.approx(direct.bytes_accessed, rel=0.05)


def test_flops_follow_bmx_formula_and_the_microbatches_on_a_large_fsdp_mesh():
    """XLA:TPU's analysis of the compiled 7B step on 32 chips counted about half the matmul work (predicted MFU
    153 % with 2 microbatches); counted before partitioning, the FLOPs are the formula's plus rematerialisation,
    and two microbatches cost twice one, less the optimizer update done once."""
    from bmx.model.config import preset
    from bmx.train.aot_compile import aot_run_config, xla_step_cost
    from bmx.train.aot_hardware import compile_only_devices
    from bmx.train.flops import training_flops_per_token

    devices = compile_only_devices(parse_topology("v5p:2x4x4"))
    overrides = {**TINY["overrides"], "vocab_size": 512}
    small = {"remat": "full", "attention": "xla", "overrides": overrides}
    one, two = (xla_step_cost(aot_run_config(tiny_config(small, global_batch_size=32 * a, grad_accumulation=a)),
                              devices, num_layers=2, with_bytes=False) for a in (1, 2))
    formula = training_flops_per_token(preset("tiny", **{**overrides, "num_hidden_layers": 2}), 256) * 32 * 256 / 32
    assert formula < one.flops < 1.6 * formula  # full remat runs each layer's forward twice
    assert 1.9 * one.flops < two.flops < 2 * one.flops


def test_cli_exits_non_zero_naming_the_largest_buffers_when_it_does_not_fit(tmp_path, capsys):
    from bmx.train.aot import main

    config_file = tmp_path / "too_big.yaml"
    config_file.write_text(json.dumps({"model": {**TINY, "remat": "none", "attention": "xla"},
                                       "train": {"seq_len": 2048, "global_batch_size": 512, "loss_vocab_chunk": 0}}))
    assert main(["--config", str(config_file), "--topology", "v5e:2x2", "--json", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "does not fit on v5e:2x2" in err and "TPU v5e has 16.0 GiB" in err
    assert "f32[262144,32000]" in err  # 128 sequences × 2048 tokens of float32 logits per device
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["fits"] is False and written["memory"] is None and "RESOURCE_EXHAUSTED" in written["compile_error"]


def test_cli_prints_the_report(tmp_path, capsys, v5p_report):
    from bmx.train.aot_format import format_report

    text = format_report(v5p_report, "tiny.yaml")
    for expected in ("on v5p:2x2x1 (4 × TPU v5p", "memory per device (HBM 95.0 GiB)", "arguments", "temporaries",
                     "fits", "largest buffers", "model (bmx MFU formula)", "XLA cost analysis", "predicted MFU",
                     "cloud.google.com/tpu/docs/v5p", "ICI", "DCN", "range", "overlap assumed",
                     "collectives in the compiled step"):
        assert expected in text


def test_config_without_a_sequence_length_or_readable_checkpoint_is_refused(tmp_path):
    from bmx.train.aot_compile import aot_run_config

    with pytest.raises(ValueError, match="train.seq_len"):
        aot_run_config(from_dict(RunConfig, {"model": TINY}))
    with pytest.raises(ValueError, match="model.preset=mistral-7b-v0.1"):
        aot_run_config(from_dict(RunConfig, {"init": {"from": str(tmp_path / "nowhere")}, "train": {"seq_len": 8}}))


def test_topologies_give_the_chips_of_the_slice():
    from bmx.train.aot_hardware import compile_only_devices

    topology = parse_topology("v5e:16x16")
    devices = compile_only_devices(topology)
    assert len(devices) == topology.num_devices == 256 and devices[0].device_kind == "TPU v5 lite"
    assert parse_topology("v5p:4x4x4").num_devices == 64
    with pytest.raises(ValueError, match="GENERATION:SHAPE"):
        parse_topology("v5p-128")
    with pytest.raises(ValueError, match="2 axes"):
        parse_topology("v5e:4x4x4")


def test_search_candidates_keep_the_global_batch():
    from bmx.train.aot_search import SearchGrid, candidates

    found = candidates(64, 8, SearchGrid(data=(1, 2), tensor=(1, 2), remat=("full",), per_device_batch=(1, 4, 16)))
    for candidate in found:
        assert candidate.data * candidate.fsdp * candidate.tensor == 8
        per_step = candidate.per_device_batch * candidate.data * candidate.fsdp * candidate.grad_accumulation
        assert per_step == 64
    assert {(c.data, c.fsdp, c.tensor, c.per_device_batch) for c in found} == {
        (1, 8, 1, 1), (1, 8, 1, 4), (1, 4, 2, 1), (1, 4, 2, 4), (1, 4, 2, 16),
        (2, 4, 1, 1), (2, 4, 1, 4), (2, 2, 2, 1), (2, 2, 2, 4), (2, 2, 2, 16)}


@pytest.mark.slow
def test_search_ranks_the_fitting_settings_by_predicted_mfu(capsys):
    from bmx.train.aot_search import SearchGrid, format_table, search

    grid = SearchGrid(tensor=(1, 2), remat=("full",), per_device_batch=(1, 2) if FULL_TESTS else (2,))
    one_layer = {"attention": "xla", "overrides": {**TINY["overrides"], "vocab_size": 512}}
    reports = search(tiny_config(one_layer), parse_topology("v5p:2x2x1"), grid)
    assert len(reports) == len(grid.tensor) * len(grid.per_device_batch) and all(r.fits for r in reports)
    mfus = [report.predicted_mfu for report in reports]
    assert mfus == sorted(mfus, reverse=True)
    assert {report.mesh["tensor"] for report in reports} == {1, 2}
    table = format_table(reports)
    assert table.splitlines()[0].startswith("fits") and len(table.splitlines()) == len(reports) + 1
    assert np.isfinite(mfus).all()


def test_splash_kernel_compiles_for_tpu_forward_and_backward():
    """The Mosaic kernels themselves (not the interpreter) go through XLA:TPU, sharded over 4 chips."""
    import jax.numpy as jnp

    from bmx.model.attention import AttentionMasking
    from bmx.model.kernels import splash_attention
    from bmx.model.sharding import logical_sharding
    from bmx.train.aot_hardware import compile_only_devices
    from bmx.train.mesh import DEFAULT_RULES, MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(fsdp=4), compile_only_devices(parse_topology("v5p:2x2x1")))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    q = jax.ShapeDtypeStruct((4, 1024, 2, 4, 128), jnp.bfloat16, sharding=rows)
    kv = jax.ShapeDtypeStruct((4, 1024, 2, 128), jnp.bfloat16, sharding=rows)

    def loss(q, k, v):
        with logical_sharding(mesh, DEFAULT_RULES):
            out = splash_attention(q, k, v, AttentionMasking(None, None, 512), 128 ** -0.5)
        return jnp.sum(out.astype(jnp.float32))

    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    assert program.count("tpu_custom_call") >= 3  # forward, dq and dkv kernels


def test_a_scan_s_stacked_outputs_are_one_buffer_not_two(tmp_path):
    """A `scan`'s stacked outputs are filled in place: the allocation XLA starts from (JAX's
    `broadcast_in_dim`) and the loop's `dynamic_update_slice` are two values of one region, and the
    report counts it once (listing values would show the 16 MiB twice and overstate what is held)."""
    import jax.numpy as jnp

    from bmx.train.aot_buffers import largest_buffers
    from bmx.train.aot_hardware import compile_only_devices

    device = compile_only_devices(parse_topology("v5p:2x2x1"))[0]

    def stacked(x, weights):
        def layer(h, w):
            h = jnp.tanh(h @ w)
            return h, h

        return jax.lax.scan(layer, x, weights)[1].sum(axis=(1, 2))  # [8, 1024, 1024] bf16 stacked: 16 MiB

    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=sharding)
    weights = jax.ShapeDtypeStruct((8, 1024, 1024), jnp.bfloat16, sharding=sharding)
    jax.jit(stacked).lower(x, weights).compile(compiler_options={"xla_dump_to": str(tmp_path)})
    buffers = largest_buffers(tmp_path)
    stacked_outputs = [b for b in buffers if b.shape == "bf16[8,1024,1024]" and b.kind == "temporary"]
    assert len(stacked_outputs) == 1, buffers
    assert stacked_outputs[0].values >= 2 and stacked_outputs[0].size_bytes == 16 << 20
