"""Run directories on object stores (gs://…): paths are not mangled and metrics are written without appends.

A memory filesystem registered for the `gs` protocol stands in for Google Cloud Storage (no network here);
it cannot append, like GCS.
"""

import json
import os

from etils import epath

from bmx.paths import absolute, is_local
from bmx.train.metrics import MetricsWriter


def test_object_store_paths_stay_absolute_urls(tmp_path):
    assert str(absolute("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    assert not is_local("gs://bucket/runs/a")
    assert str(absolute("relative/run")) == str(epath.Path(os.getcwd()) / "relative/run")


def test_metrics_on_an_object_store_are_rewritten_and_trimmed_on_resume(fake_gcs):
    run_dir = epath.Path("gs://bucket/runs/a")
    writer = MetricsWriter(run_dir, resume_step=0, tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    resumed = MetricsWriter(run_dir, resume_step=2, tensorboard=False)  # step 3 will be trained again
    resumed.write(3, {"loss": 0.5})
    resumed.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.5)]


def test_local_metrics_are_appended(tmp_path):
    writer = MetricsWriter(tmp_path, resume_step=0, tensorboard=False)
    writer.write(1, {"loss": 2.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    writer.close()
