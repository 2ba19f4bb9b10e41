"""`bmx.checkpoints`: one loader for bmx, quantized and Hugging Face directories, checked against transformers."""

import json

import numpy as np
import pytest

from bmx import checkpoints
from bmx.convert import hf_to_bmx
from hf_reference import hf_logits, save_tiny_hf_model
from object_store import upload

INPUT_IDS = np.array([[1, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12]])  # longer than the window of 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    reference = save_tiny_hf_model(root / "hf", max_shard_size="40KB")  # sharded, with an index
    hf_to_bmx(root / "hf", root / "bmx", progress=False)
    return root, reference


def test_an_hf_directory_loads_in_memory_with_transformers_logits(model_dirs):
    root, reference = model_dirs
    assert checkpoints.checkpoint_kind(root / "hf") == "hf"
    model, config = checkpoints.load(root / "hf")
    assert config.num_hidden_layers == 2 and config.sliding_window == 8
    np.testing.assert_allclose(np.asarray(model(INPUT_IDS)), hf_logits(reference, INPUT_IDS), atol=1e-4)
    assert sorted(p.name for p in root.iterdir()) == ["bmx", "hf"]  # no temporary checkpoint left behind


def test_hf_and_converted_bmx_load_to_the_same_parameters(model_dirs):
    root, _ = model_dirs
    from flax import nnx

    from_hf, _ = checkpoints.load(root / "hf")
    from_bmx, _ = checkpoints.load(root / "bmx")
    a, b = nnx.state(from_hf, nnx.Param).to_pure_dict(), nnx.state(from_bmx, nnx.Param).to_pure_dict()
    import jax

    for (path, left), right in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert left.dtype == right.dtype and np.array_equal(np.asarray(left), np.asarray(right)), path


def test_a_dtype_is_applied_to_every_kind(model_dirs):
    root, _ = model_dirs
    for kind in ("hf", "bmx"):
        model, _ = checkpoints.load(root / kind, dtype="bfloat16")
        assert str(model.model.embed_tokens.weight.value.dtype) == "bfloat16", kind


def test_what_is_not_a_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        checkpoints.checkpoint_kind(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"neither a bmx checkpoint \(bmx_checkpoint.json\) nor a Hugging Face"):
        checkpoints.checkpoint_kind(tmp_path)
    (tmp_path / "bmx_checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bmx_checkpoint.json: not valid JSON"):
        checkpoints.checkpoint_kind(tmp_path)


def test_the_tokenizer_is_found_by_one_rule(tmp_path):
    assert checkpoints.find_tokenizer(tmp_path) == "mistral-v0.1"
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.model").write_bytes(b"x")
    assert checkpoints.find_tokenizer(tmp_path) == str(tmp_path / "tokenizer")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({}))
    assert checkpoints.find_tokenizer(hf) == str(hf)


def test_an_hf_directory_on_an_object_store_loads_like_a_local_one(model_dirs, fake_gcs):
    root, reference = model_dirs
    upload(root / "hf", "gs://bucket/models/hf")
    assert checkpoints.checkpoint_kind("gs://bucket/models/hf") == "hf"
    model, config = checkpoints.load("gs://bucket/models/hf")
    assert config.num_hidden_layers == 2
    np.testing.assert_allclose(np.asarray(model(INPUT_IDS)), hf_logits(reference, INPUT_IDS), atol=1e-4)
    assert checkpoints.find_tokenizer("gs://bucket/models/hf") == "mistral-v0.1"


@pytest.mark.parametrize("kind", ["bmx", "hf"])
def test_the_decoding_layout_loads_with_transformers_logits(model_dirs, kind):
    from flax import nnx

    root, reference = model_dirs
    model, _ = checkpoints.load(root / kind, decoding_layout=True)
    assert isinstance(model.model.layers, nnx.List) and len(model.model.layers) == 2
    np.testing.assert_allclose(np.asarray(model(INPUT_IDS)), hf_logits(reference, INPUT_IDS), atol=1e-4)


def test_a_bmx_checkpoint_read_layer_by_layer_equals_the_stacked_one_unstacked(model_dirs):
    import jax
    from flax import nnx

    from bmx.model import unstack_layers

    root, _ = model_dirs
    by_layer, _ = checkpoints.load(root / "bmx", dtype="bfloat16", decoding_layout=True)
    unstacked = unstack_layers(checkpoints.load(root / "bmx", dtype="bfloat16")[0])
    a, b = nnx.state(by_layer, nnx.Param).to_pure_dict(), nnx.state(unstacked, nnx.Param).to_pure_dict()
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, left), right in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert left.dtype == right.dtype and np.array_equal(np.asarray(left), np.asarray(right)), path


def test_a_layer_that_cannot_be_read_is_named(model_dirs, monkeypatch):
    import bmx.model.checkpoint as bmx_checkpoint

    class Unreadable:  # what tensorstore raises on a truncated chunk
        def __getitem__(self, layer):
            raise OSError("DATA_LOSS: Error reading chunk")

    monkeypatch.setattr(bmx_checkpoint, "open_param", lambda directory, keys: Unreadable())
    root, _ = model_dirs
    with pytest.raises(ValueError, match=r"cannot read parameter model\.layers\.\w+.*DATA_LOSS.*damaged bmx"):
        checkpoints.load(root / "bmx", decoding_layout=True)


def test_the_compute_dtype_follows_a_16_bit_model_on_cpu():
    import jax.numpy as jnp

    from bmx.model.checkpoint import default_compute_dtype

    assert default_compute_dtype() == jnp.float32
    assert default_compute_dtype(jnp.float32) == jnp.float32
    assert default_compute_dtype("bfloat16") == jnp.bfloat16
    assert default_compute_dtype(jnp.float16) == jnp.float16
