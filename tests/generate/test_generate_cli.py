"""`python -m bmx.generate`: JSON lines out equal to transformers' greedy generation; console streaming."""

import json
import re

import pytest
import torch
from generate.generation_testing import hf_tokenizer_dir
from hf_reference import save_tiny_hf_model
from transformers import AutoTokenizer

from bmx.convert import hf_to_bmx
from bmx.generate.__main__ import main

PROMPTS = ["Aspirin inhibits", "The most common cause of community-acquired pneumonia is"]


def test_prompts_file_to_jsonl_matches_transformers(tmp_path, capsys):
    reference = save_tiny_hf_model(tmp_path / "hf", seed=7, vocab_size=32000, sliding_window=8)
    hf_to_bmx(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    output = tmp_path / "out.jsonl"
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(prompts_file), "--greedy",
                 "--max-new-tokens", "9", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer_dir(tmp_path / "tok"), local_files_only=True)
    assert [r["prompt"] for r in records] == PROMPTS
    for record in records:
        prompt_ids = hf_tokenizer(record["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            expected = reference.generate(prompt_ids, do_sample=False, max_new_tokens=9)[0, prompt_ids.shape[1]:].tolist()
        assert record["token_ids"] == expected
        assert record["text"] == hf_tokenizer.decode(expected, skip_special_tokens=True)
    console = capsys.readouterr().out
    positions = [console.index(f"=== [{i}] {p}\n{r['text']}\n") for i, (p, r) in enumerate(zip(PROMPTS, records))]
    assert positions == sorted(positions)


def test_adapter_option_generates_like_peft(tmp_path):
    """`--adapter DIR`: greedy ids equal PEFT's `generate` with the same adapter on transformers' model."""
    import jax
    from peft import PeftModel

    from bmx.lora import LoRAConfig, apply_lora, lora_modules, save_peft_adapter
    from bmx.model import load

    reference = save_tiny_hf_model(tmp_path / "hf", seed=8, vocab_size=32000, sliding_window=8)
    hf_to_bmx(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    adapted, _ = load(tmp_path / "ckpt")
    config = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    apply_lora(adapted, config)
    for number, (_, module) in enumerate(lora_modules(adapted)):
        module.lora_b.value = 0.5 * jax.random.normal(jax.random.key(number), module.lora_b.shape)
    save_peft_adapter(adapted, config, tmp_path / "adapter")
    output = tmp_path / "out.jsonl"
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "adapter"), "--prompt", PROMPTS[1],
                 "--greedy", "--max-new-tokens", "9", "--output", str(output), "--quiet"]) == 0
    record = json.loads(output.read_text())

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer_dir(tmp_path / "tok"), local_files_only=True)
    prompt_ids = hf_tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    plain = reference.generate(prompt_ids, do_sample=False, max_new_tokens=9)[0, prompt_ids.shape[1]:].tolist()
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model.generate(input_ids=prompt_ids, do_sample=False, max_new_tokens=9)[0, prompt_ids.shape[1]:]
    assert record["token_ids"] == expected.tolist() != plain


@pytest.mark.parametrize("line, message", [("not json", "not valid JSON"), ('{"text": "x"}', 'string "prompt"')])
def test_bad_prompts_file_names_the_line(tmp_path, capsys, line, message):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    assert main(["--ckpt", str(tmp_path), "--prompts", str(prompts_file)]) == 2
    error = capsys.readouterr().err
    assert "prompts.jsonl:2: " in error and message in error


def test_missing_checkpoint_is_an_error_naming_it(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.fixture
def short_model(tmp_path):
    """A model of 64 positions, as a transformers model and a bmx checkpoint."""
    reference = save_tiny_hf_model(tmp_path / "hf", seed=9, vocab_size=32000, max_position_embeddings=64)
    hf_to_bmx(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    return reference, tmp_path / "ckpt"


LONG_PROMPT = " ".join(["the patient presented with fever and cough"] * 12)  # over 64 tokens


def test_generation_past_max_position_embeddings_is_refused(short_model, tmp_path, capsys):
    _, ckpt = short_model
    output = tmp_path / "out.jsonl"
    assert main(["--ckpt", str(ckpt), "--prompt", LONG_PROMPT, "--max-new-tokens", "4", "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and re.search(r"prompt 0: \d\d+ prompt tokens \+ max_new_tokens 4", error)
    assert "max_position_embeddings 64" in error and "--truncate-prompt" in error
    assert not output.exists()


def test_truncate_prompt_keeps_the_last_tokens_and_warns(short_model, tmp_path, capsys):
    """`--truncate-prompt`: the ids transformers generates from the prompt's last 64 - 4 tokens."""
    reference, ckpt = short_model
    output = tmp_path / "out.jsonl"
    assert main(["--ckpt", str(ckpt), "--prompt", LONG_PROMPT, "--max-new-tokens", "4", "--greedy", "--quiet",
                 "--truncate-prompt", "--output", str(output)]) == 0
    assert "warning: prompt 0: " in capsys.readouterr().err
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_tokenizer_dir(tmp_path / "tok"), local_files_only=True)
    kept = hf_tokenizer(LONG_PROMPT, return_tensors="pt").input_ids[:, -60:]
    with torch.no_grad():
        expected = reference.generate(kept, do_sample=False, max_new_tokens=4)[0, 60:].tolist()
    assert json.loads(output.read_text())["token_ids"] == expected
