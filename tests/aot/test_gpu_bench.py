"""`bench/gpu.py --smoke` runs end to end here, so that the GPU benchmark works the first time a GPU is at hand.

On CPU it trains the tiny model through the trainer's own step (cuDNN attention needs a GPU and is
skipped), predicts the step with the AOT tool (judged as an H100, the chip table's fallback), and times
generation of bmx and transformers on the same bf16 model.
"""

import importlib.util
import json
import math

from conftest import REPO_ROOT


def test_gpu_benchmark_smoke_run_prints_train_generate_and_prediction(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO_ROOT / "bench" / "gpu.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)

    assert gpu_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| model | attention | batch × seq | tokens/s | MFU | predicted tokens/s | predicted MFU" in out
    assert "| bmx / transformers |" in out
    written = json.loads((tmp_path / "gpu_bench.json").read_text())
    (train,) = written["train"]
    assert train["attention"] == "xla" and train["tokens_per_second"] > 0 and math.isfinite(train["loss"])
    assert 0 < train["mfu"] and 0 < train["predicted_mfu"] < 1 and train["predicted_tokens_per_second"] > 0
    assert [row["implementation"] for row in written["generate"]] == ["bmx", "transformers"]
    assert all(row["prefill_tokens_per_second"] > 0 and row["decode_tokens_per_second"] > 0
               for row in written["generate"])
