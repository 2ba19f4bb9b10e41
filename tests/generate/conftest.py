"""The tests here compare against transformers generation and training: torch on one thread."""

from torch_threads import single_threaded_torch  # noqa: F401  (an autouse fixture)
