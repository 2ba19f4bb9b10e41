"""torch runs one thread in the tests that use this fixture: on a shared 2-core machine its OpenMP
threads spin and turn a 0.3 s transformers `generate` into 20 s; the previous setting is restored
after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_threaded_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
