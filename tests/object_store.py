"""A memory filesystem registered for `gs://`: Google Cloud Storage without the network.

Like GCS it cannot append. Paths through `etils.epath` reach it; orbax's own tensorstore I/O does not
(tensorstore speaks to GCS directly), so it stands in for what bmx reads and writes through epath.
"""

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError("object stores cannot append")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs():
    previous = {name: fsspec.registry.get(name) for name in ("gs", "gcs")}
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    yield
    FakeGCS.store.clear()
    for name, implementation in previous.items():
        if implementation is not None:
            fsspec.register_implementation(name, implementation, clobber=True)


def upload(local_dir, url: str) -> None:
    """Copy a local directory's files to `url` (one level, as model directories are)."""
    from etils import epath

    for path in sorted(local_dir.iterdir()):
        if path.is_file():
            (epath.Path(url) / path.name).write_bytes(path.read_bytes())
