"""The only calls bmx makes into jax's and orbax's private modules, each with why no public API does.

They may move in any release of those libraries; keeping them here means one file to fix, and the
tests that exercise them (`tests/quant/test_quant_streaming.py`, `tests/aot`) say when it is needed.
"""

from __future__ import annotations

from typing import Any


def open_orbax_array(params_dir: str, name: str, *, use_zarr3: bool, use_ocdbt: bool):
    """A tensorstore handle on one array of an orbax PyTree checkpoint (`name`: its dotted key path).

    Orbax restores whole arrays (or shards); reading one layer's slice of a scanned `[layers, ...]`
    array without reading the rest (streamed quantization of a 7B checkpoint) needs the tensorstore
    spec orbax builds for its own files, which only `tensorstore_utils` exposes.
    """
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils

    spec = tensorstore_utils.ArrayReadSpec(params_dir, name, use_zarr3=use_zarr3, use_ocdbt=use_ocdbt)
    return ts.open(spec.json, context=tensorstore_utils.get_ts_context(use_ocdbt=use_ocdbt)).result()


def hlo_module_cost_analysis(hlo_module, backend) -> dict[str, Any]:
    """XLA's HLO cost analysis of `hlo_module` run by `backend` (a jax backend client).

    `Lowered.cost_analysis()` asks the program's own client, and libtpu's compile-only TPU client has
    no analysis; jax exposes running it on another backend (the CPU's) only in its C++ bindings.
    """
    from jax._src.lib import _jax

    return _jax.hlo_module_cost_analysis(backend, hlo_module)
