"""`python -m bmx.eval.harness run --model bmx --model_args ckpt=DIR --tasks ...`: lm-eval's CLI, bmx registered."""

import bmx.eval.harness  # noqa: F401  (registers the `bmx` model)
from bmx.compile_cache import enable_compile_cache
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    enable_compile_cache()  # JAX's persistent cache: a second run skips compilation
    cli_evaluate()
