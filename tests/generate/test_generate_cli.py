"""`python -m bmx.generate`: JSON lines out equal to transformers' greedy generation; console streaming."""

import json

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
