"""`logging.wandb`: an offline W&B run holds the metrics.jsonl rows and the resolved config, read back from
wandb's own transaction log with wandb's own protobuf messages; W&B stays optional and off the network."""

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf.message import DecodeError

from bmx.config_io import ConfigError, from_dict
from bmx.train.config import RunConfig
from train.test_train import pmc_tokens, run_config, write_config  # noqa: F401 (pmc_tokens is a fixture)

WANDB = {"project": "bmx-test", "mode": "offline"}


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """wandb's settings and caches under tmp_path, and any server address unreachable: nothing leaves the machine."""
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home" / variable.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def wandb_records(path: Path) -> list:
    """The `Record` messages of a `.wandb` file: a 7-byte header (`:W&B`, magic, version), then LevelDB's
    log format (32 KiB blocks of chunks, each `crc32c u32, length u16, type u8` + payload)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE…/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(offline_run: Path, timeout: float = 60) -> list:
    """The records of an offline run once its `exit` record is on disk: `run.finish()` returns before
    wandb's service has flushed the log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(next(offline_run.glob("run-*.wandb")))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except (StopIteration, DecodeError):  # not created yet, or a record half written
            pass
        assert time.monotonic() < deadline, f"{offline_run}: no exit record after {timeout} s"
        time.sleep(0.1)


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def logged_rows(records) -> dict[int, dict]:
    """step → the metrics logged at it, without W&B's own `_step`, `_runtime`, `_timestamp`."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows[record.history.step.num] = {item_key(item): json.loads(item.value_json)
                                             for item in record.history.item if not item_key(item).startswith("_")}
    return rows


def test_offline_run_holds_every_metrics_jsonl_row_and_the_resolved_config(
        tmp_path, pmc_tokens, offline_wandb):  # noqa: F811 (pmc_tokens: the fixture imported above)
    import jax

    from bmx.train.loop import train

    config = from_dict(RunConfig, run_config(tmp_path, pmc_tokens, train={"steps": 3, "global_batch_size": 8},
                                             logging={"wandb": WANDB}))
    train(config, devices=jax.devices()[:1])
    run_dir = Path(config.run_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline_runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1, list((run_dir / "wandb").iterdir())
    records = finished_records(offline_runs[0])

    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in jsonl] == [1, 2, 3]
    assert logged_rows(records) == {row.pop("step"): row for row in jsonl}

    [run] = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_id) == ("bmx-test", "run", run_id)
    logged_config = {item_key(item): json.loads(item.value_json) for item in run.config.update
                     if item_key(item) != "_wandb"}
    assert logged_config == yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_restarted_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    from bmx.train.metrics import MetricsWriter
    from bmx.train.wandb_logging import WandbConfig

    for step in (1, 2):  # two starts of one run directory, as after a preemption
        writer = MetricsWriter(tmp_path, step - 1, tensorboard=False, wandb=WandbConfig(**WANDB), run_config={})
        writer.write(step, {"loss": 1.0 / step})
        writer.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" appended when both starts fall in the same second
    assert len(runs) == 2 and len({run.name.split("-")[3] for run in runs}) == 1, runs
    assert [logged_rows(finished_records(run)) for run in runs] == [{1: {"loss": 1.0}}, {2: {"loss": 0.5}}]


def test_only_process_0_and_no_disabled_run_writes_wandb_files(tmp_path, offline_wandb):
    from bmx.train.metrics import MetricsWriter
    from bmx.train.wandb_logging import WandbConfig

    (tmp_path / "b").mkdir()  # the trainer makes the run directory first
    other_process = MetricsWriter(tmp_path / "a", 0, tensorboard=False, enabled=False, wandb=WandbConfig(**WANDB))
    disabled = MetricsWriter(tmp_path / "b", 0, tensorboard=False, wandb=WandbConfig("bmx-test", mode="disabled"))
    for writer in (other_process, disabled):
        writer.write(1, {"loss": 1.0})
        writer.close()
        assert writer.wandb_run is None
    assert not (tmp_path / "a").exists() and sorted(path.name for path in (tmp_path / "b").iterdir()) == ["metrics.jsonl"]


def test_wandb_configured_but_not_installed_is_a_one_line_config_error(tmp_path, monkeypatch, capsys):
    from bmx.train.__main__ import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to find_spec
    with pytest.raises(ConfigError, match="logging.wandb is set but wandb is not installed"):
        from_dict(RunConfig, {"logging": {"wandb": WANDB}})
    from_dict(RunConfig, {"logging": {"wandb": {**WANDB, "mode": "disabled"}}})  # needs no wandb

    config_path = write_config(tmp_path, {"run_dir": str(tmp_path / "run"), "logging": {"wandb": WANDB}})
    assert main(["--config", str(config_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "logging.wandb" in error and "pip install 'bmx[wandb]'" in error
    assert not (tmp_path / "run").exists()
