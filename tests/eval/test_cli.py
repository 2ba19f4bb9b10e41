"""`python -m bmx.eval` end to end: results.json, predictions.jsonl, the paper-style table, the diagrams."""

import json
import os
import subprocess
import sys

import pytest

from bmx.eval.__main__ import main
from bmx.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def biomistral_run(tmp_path_factory, tiny_bmx_ckpt, eval_dir):
    out = tmp_path_factory.mktemp("eval_out")
    code = main(["--ckpt", str(tiny_bmx_ckpt), "--tasks", "mmlu_anatomy,medmcqa", "--protocol", "biomistral",
                 "--shots", "3", "--seeds", "2", "--limit", "5", "--data-dir", str(eval_dir), "--out", str(out)])
    assert code == 0
    return out


def test_results_json_has_every_task_with_acc_n_and_the_average(biomistral_run):
    results = json.loads((biomistral_run / "results.json").read_text())
    assert set(results["tasks"]) == {"mmlu_anatomy", "medmcqa"}
    for summary in results["tasks"].values():
        assert summary["n"] == 5 and summary["seeds"] == [1, 2] and len(summary["acc_per_seed"]) == 2
        assert {"acc", "acc_std", "ece_paper", "ece_10bin", "shot_source"} <= set(summary)
    assert results["average"] == pytest.approx(sum(s["acc"] for s in results["tasks"].values()) / 2)


def test_every_number_traces_to_its_questions_in_predictions_jsonl(biomistral_run, eval_dir):
    records = [json.loads(line) for line in (biomistral_run / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 5 * 2  # tasks x questions x shot sets
    results = json.loads((biomistral_run / "results.json").read_text())
    for name, summary in results["tasks"].items():
        for seed, accuracy in zip(summary["seeds"], summary["acc_per_seed"]):
            mine = [r for r in records if r["task"] == name and r["seed"] == seed]
            assert accuracy == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
    tokenizer = load_tokenizer("mistral-v0.1")
    assert all(r["top_token"] == tokenizer.id_to_piece(r["top_token_id"]) for r in records)


def test_markdown_table_has_the_papers_columns(biomistral_run):
    table = (biomistral_run / "results.md").read_text()
    assert "| Model | Anatomy | MedMCQA | Avg. |" in table
    assert "ECE (paper, 5 bins)" in table


def test_one_reliability_diagram_png_per_task(biomistral_run):
    for name in ("mmlu_anatomy", "medmcqa"):
        assert (biomistral_run / "reliability" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loglik_from_an_hf_directory_with_the_data_dir_from_the_environment(tmp_path, tiny_hf_dir, eval_dir,
                                                                          monkeypatch):
    monkeypatch.setenv("BMX_EVAL_DATA", str(eval_dir))
    code = main(["--ckpt", str(tiny_hf_dir), "--tasks", "medmcqa", "--protocol", "loglik", "--shots", "0",
                 "--limit", "4", "--no-plots", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "results.json").read_text())["tasks"]["medmcqa"]
    assert summary["seeds"] == [1] and {"acc", "acc_norm", "n"} <= set(summary)


def test_bad_input_is_one_line_naming_what_is_wrong(tmp_path, tiny_bmx_ckpt, capsys):
    code = main(["--ckpt", str(tiny_bmx_ckpt), "--tasks", "medqa", "--data-dir", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "missing" in error and error.startswith("bmx eval: error:")
    code = main(["--ensemble", "a", "b", "--protocol", "loglik", "--out", str(tmp_path / "out")])
    assert code == 2 and "biomistral" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess that imports lm-eval and loads the model again
def test_lm_eval_command_line_runs_the_bmx_model(tmp_path, tiny_bmx_ckpt, eval_dir):
    task = tmp_path / "tasks" / "bmx_cli_medqa.yaml"
    task.parent.mkdir()
    task.write_text(f"""task: bmx_cli_medqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {eval_dir / 'medqa' / 'US_4_options_phrases_no_exclude_test.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{[options.A, options.B, options.C, options.D]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer_idx)}}}}"
metric_list:
  - metric: acc
""")
    completed = subprocess.run(
        [sys.executable, "-m", "bmx.eval.harness", "run", "--model", "bmx", "--model_args", f"ckpt={tiny_bmx_ckpt}",
         "--tasks", "bmx_cli_medqa", "--include_path", str(task.parent), "--limit", "3",
         "--output_path", str(tmp_path / "lm_eval_out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "bmx_cli_medqa" in completed.stdout and "acc" in completed.stdout
