"""`prepare` and the loader under faults: stale shards, bombs, a full disk, a killed worker, nothing kept.

Each fault is either refused with one line naming the directory or file (CLI exit 2) or skipped
and listed; nothing is left that looks like a finished preparation of the wrong data.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
import zlib

import pytest
from tqdm import tqdm

from bmx.data import prepare as prepare_module
from bmx.data.__main__ import main as data_cli
from bmx.data.loader import make_loader
from bmx.data.prepare import PrepareSettings, WorkerDied, prepare

SETTINGS = PrepareSettings(seq_len=64, val_fraction=0.0)


@pytest.fixture(scope="module")
def two_preparations(tmp_path_factory, article):
    """The same settings on different articles: shards with the same names and other contents."""
    root = tmp_path_factory.mktemp("preparations")
    first = prepare([str(article("phage_lysis"))], root / "first", SETTINGS, progress=False)
    second = prepare([str(article("climate")), str(article("oxytricha"))], root / "second", SETTINGS, progress=False)
    assert first["splits"]["train"]["shards"] == second["splits"]["train"]["shards"]
    assert first["sequences"] != second["sequences"]
    return root / "first", root / "second"


def one_line_error(capsys) -> str:
    """The CLI's error: one line, the last on stderr (after any progress bars), no traceback."""
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "Traceback" not in err and err.count("error: ") == 1 and last.startswith("bmx data: error: "), err
    return last


def test_prepare_refuses_an_output_directory_it_did_not_create(tmp_path, two_preparations, article, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "train-00000-of-00001.array_record"  # the probe: an old shard, no manifest
    shutil.copy(two_preparations[1] / stale.name, stale)
    before = stale.read_bytes()
    assert data_cli(["prepare", str(article("phage_lysis")), "--out", str(out), "--seq-len", "64",
                     "--val-fraction", "0"]) == 2
    assert f"{out} is not empty (train-00000-of-00001.array_record) and was not made by prepare" in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == [stale.name] and stale.read_bytes() == before


def test_the_loader_checks_each_shard_against_the_manifest_before_reading(tmp_path, two_preparations):
    first, second = two_preparations
    data = tmp_path / "data"
    shutil.copytree(first, data)
    shard = data / "train-00000-of-00001.array_record"
    shutil.copy(second / shard.name, shard)  # a shard of another preparation under this manifest
    with pytest.raises(ValueError, match=rf"{shard} holds \d+ records, .*manifest.json says \d+"):
        make_loader(data, global_batch_size=2, process_index=0, process_count=1)
    shard.write_bytes(b"not an array record")
    with pytest.raises(ValueError, match=rf"{shard} is not a readable ArrayRecord file"):
        make_loader(data, global_batch_size=2, process_index=0, process_count=1)


def whitespace_gzip(size: int) -> bytes:
    """`size` bytes of spaces, gzipped a mebibyte at a time (what a decompression bomb looks like)."""
    compressor, out = zlib.compressobj(9, zlib.DEFLATED, 31), [b""]
    block = b" " * (1 << 20)
    for _ in range(size >> 20):
        out.append(compressor.compress(block))
    out.append(compressor.flush())
    return b"".join(out)


@contextlib.contextmanager
def peak_python_memory():
    tracemalloc.start()
    peak = {}
    try:
        yield peak
    finally:
        peak["bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_decompression_bombs_are_skipped_with_bounded_memory(tmp_path, article):
    cap, inflated = 4 << 20, 96 << 20
    bomb = tmp_path / "bomb.xml.gz"
    bomb.write_bytes(whitespace_gzip(inflated))
    assert bomb.stat().st_size < inflated / 500
    package = tmp_path / "package.tar.gz"
    with tarfile.open(package, "w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("PMC1/huge.nxml")
        info.size = 2 * cap
        archive.addfile(info, io.BytesIO(b" " * info.size))
        good = article("phage_lysis").read_bytes()
        info = tarfile.TarInfo("PMC2/article.nxml")
        info.size = len(good)
        archive.addfile(info, io.BytesIO(good))
    settings = PrepareSettings(seq_len=64, val_fraction=0.0, max_document_bytes=cap)
    with peak_python_memory() as peak:
        manifest = prepare([str(bomb), str(package)], tmp_path / "out", settings, progress=False)
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert reasons == {
        str(bomb): f"document larger than the {cap}-byte cap (once decompressed; --max-document-bytes raises it)",
        f"{package}::PMC1/huge.nxml": f"document larger than the {cap}-byte cap ({2 * cap} bytes; "
                                      "--max-document-bytes raises it)",
    }
    assert manifest["documents"] == 1  # the article after the oversized member is still read
    assert peak["bytes"] < 4 * cap, peak  # never the 96 MiB the bomb inflates to
    assert {item["path"] for item in manifest["inputs"]} == {str(bomb), str(package)}
    with gzip.open(bomb) as whole:  # the input hash is still the hash of the whole file
        assert whole.read(10) == b" " * 10


def test_prepare_fails_when_every_input_is_rejected_unless_allowed(tmp_path, capsys):
    broken = tmp_path / "broken.nxml"
    broken.write_bytes(b"<article><front>cut off")
    assert data_cli(["prepare", str(broken), "--out", str(tmp_path / "out"), "--seq-len", "64"]) == 2
    error = one_line_error(capsys)
    assert f"every input was rejected: 1 skipped (first: {broken}: malformed or truncated XML" in error
    assert "--allow-empty" in error
    assert data_cli(["prepare", str(broken), "--out", str(tmp_path / "out"), "--seq-len", "64", "--allow-empty"]) == 0


def test_a_killed_worker_is_one_line_naming_what_to_do(tmp_path):
    pool = prepare_module._worker_pool(2)
    try:
        with pytest.raises(WorkerDied, match="a worker process died .* re-run the same command to resume"):
            prepare_module._run(os._exit, [(9,), (9,)], pool, tqdm(disable=True), [1, 1])  # dies as SIGKILL does
    finally:
        pool.shutdown()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 100 KiB tmpfs: room for the tokenized parts of a few articles, not for their shards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_a_rerun_with_space_resumes(tiny_disk, tmp_path, pmc_dir, capsys):
    articles = [str(p) for p in sorted((pmc_dir / "plos_allofplos" / "starter_corpus").glob("*.xml"))[:3]]
    out = tiny_disk / "out"
    arguments = ["prepare", *articles, "--seq-len", "64", "--val-fraction", "0"]
    assert data_cli([*arguments, "--out", str(out)]) == 2
    assert f"no space left on device while writing {out}" in one_line_error(capsys)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.array_record*"))
    shutil.copytree(out, tmp_path / "roomy", symlinks=True)  # the same directory, on a disk with space
    assert data_cli([*arguments, "--out", str(tmp_path / "roomy")]) == 0
    assert data_cli([*arguments, "--out", str(tmp_path / "reference")]) == 0
    for name in ("manifest.json", "train-00000-of-00001.array_record"):
        assert (tmp_path / "roomy" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
