"""BioMistral-7B's real size on one machine: convert, merge, quantize and run it next to each peer.

    python bench/at_7b.py [--shape 7b|1b|tiny] [--layers N] [--steps inputs,convert,quant,awq,infer,merge]
                          [--workdir runs/at_7b] [--json FILE] [--questions 3] [--new-tokens 32]

Every measured command runs in its own process (wall time and peak RSS from `os.wait4`); results are
cached per step under WORKDIR/results, so `--steps` reruns a subset and the table shows them all.

- inputs: a random bf16 checkpoint of exactly Mistral-7B-v0.1's shape and file layout (config.json,
  two safetensors shards with an index, the v0.1 tokenizer from `mistral-common`), written tensor by
  tensor; matrices N(0, initializer_range), norms 1 + N(0, 0.1). The merge step adds the "fine-tuned"
  partner: the same tensors plus a delta of a tenth of their scale.
- convert: reading the safetensors, a plain sequential write of as many bytes (what this disk takes),
  `hf-to-bmx`, `bmx-to-hf`; the round trip compared byte for byte on every tensor.
- quant: `python -m bmx.quant` int8, NF4 + double quantization, FP4, against bitsandbytes on the
  same tensors (every linear compared bit for bit).
- awq: AWQ's search on two decoder layers of the 7B; per-layer and whole-model times are extrapolated.
- infer: letter probabilities on real MedQA questions (3-shot, BioMistral's protocol) and 32 greedy
  tokens, bmx and transformers on the same token ids.
- merge: BioMistral's SLERP, TIES and DARE configs with `python -m bmx.merge` and `mergekit-yaml`.

Disk: each step deletes its outputs once checked (the 7B run peaks near 45 GB: three 7B checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
GB = 1e9
STEPS = ("inputs", "merge", "convert", "quant", "infer", "awq")  # merge first: its partner leaves room after
# (hidden, intermediate, layers, heads, kv heads); vocab 32000, head_dim 128 at 7B.
SHAPES = {"7b": (4096, 14336, 32, 32, 8), "1b": (2048, 7168, 16, 16, 8), "tiny": (256, 768, 2, 4, 2)}
PUBLISHED_BYTES = {"bf16": 15.0e9, "awq": 4.68e9, "nf4": 5.03e9, "int8": 8.04e9}  # BioMistral's HF repos
QUANT_RUNS = {"int8": ["--method", "int8"], "nf4": ["--method", "nf4", "--double-quant"], "fp4": ["--method", "fp4"]}
MERGE_CONFIGS = ("slerp", "ties", "dare")
BASE_NAME, TUNED_NAME = "mistralai/Mistral-7B-Instruct-v0.1", "BioMistral/BioMistral-7B"


def hf_config(shape: str, layers: int | None) -> dict:
    hidden, intermediate, num_layers, heads, kv_heads = SHAPES[shape]
    return {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
            "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": heads,
            "num_hidden_layers": layers or num_layers, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "use_cache": True, "vocab_size": 32000}


# ---- the parent: run each step's commands in their own processes -------------------------------

class Bench:
    def __init__(self, args):
        self.args, self.work = args, args.workdir.resolve()
        for sub in ("results", "logs"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.base, self.tuned, self.bmx = self.work / "hf_base", self.work / "hf_tuned", self.work / "bmx"
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(self, label: str, argv: list[str], need_gb: float = 0.0) -> dict:
        """Run `argv`; its wall time, peak RSS and the JSON object on its last stdout line (if any)."""
        try:
            self.wait_for_memory(label, need_gb)
        except RuntimeError as error:  # recorded as not run; the other steps go on
            print(f"    NOT RUN: {error}", flush=True)
            return {"seconds": None, "peak_rss_gb": None, "exit_code": -1, "error": f"not run: {error}"}
        log = self.work / "logs" / f"{label}.log"
        print(f"  {label}: {' '.join(map(str, argv))[:160]}", flush=True)
        started = time.perf_counter()
        with open(log, "w") as out:
            process = subprocess.Popen(list(map(str, argv)), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                       cwd=ROOT)
            _, status, usage = os.wait4(process.pid, 0)
        seconds, code = time.perf_counter() - started, os.waitstatus_to_exitcode(status)
        lines = log.read_text(errors="replace").strip().splitlines()
        result = {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / GB, "exit_code": code}
        if code != 0:
            result["error"] = next((line for line in reversed(lines) if line.strip()), "")[-300:]
            print(f"    FAILED ({code}): {result['error']}", flush=True)
        elif lines and lines[-1].startswith("{"):
            result.update(json.loads(lines[-1]))
        print(f"    {seconds:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB", flush=True)
        return result

    def child(self, label: str, name: str, *args, need_gb: float = 0.0) -> dict:
        return self.run(label, [sys.executable, HERE, "--child", name, *args], need_gb)

    def wait_for_memory(self, label: str, need_gb: float, patience_s: float = 1800) -> None:
        """Other jobs share this machine: wait until `need_gb` is available rather than swap or be killed."""
        deadline = time.time() + patience_s
        while available_gb() < need_gb:
            if time.time() > deadline:
                raise RuntimeError(f"{label}: {need_gb:.0f} GB never became available (now {available_gb():.1f})")
            print(f"    waiting for {need_gb:.0f} GB of free memory ({available_gb():.1f} now)", flush=True)
            time.sleep(30)

    def save(self, step: str, result: dict) -> None:
        result["machine"] = machine_state(self.work)
        (self.work / "results" / f"{step}.json").write_text(json.dumps(result, indent=2) + "\n")

    def model_gb(self) -> float:
        return directory_bytes(self.base) / GB

    # -- steps --

    def inputs(self) -> dict:
        shutil.rmtree(self.base, ignore_errors=True)
        result = self.child("inputs", "make-model", self.base, self.args.shape, self.args.layers or 0, "0")
        return {"make": result, "bytes": directory_bytes(self.base)}

    def convert(self) -> dict:
        back = self.work / "hf_back"
        shutil.rmtree(self.bmx, ignore_errors=True), shutil.rmtree(back, ignore_errors=True)
        size = directory_bytes(self.base)
        rows = {"read": self.child("convert-read", "read", self.base),
                "disk-write": self.child("convert-disk-write", "disk-write", self.work / "disk_probe.bin", size),
                "hf-to-bmx": self.run("convert-hf-to-bmx", [sys.executable, "-m", "bmx.convert", "hf-to-bmx",
                                                           self.base, self.bmx]),
                "bmx-to-hf": self.run("convert-bmx-to-hf", [sys.executable, "-m", "bmx.convert", "bmx-to-hf",
                                                           self.bmx, back, "--max-shard-size", "10GB"])}
        rows["compare"] = self.child("convert-compare", "compare-hf", self.base, back)
        shutil.rmtree(back, ignore_errors=True)
        return {"bytes": size, "rows": rows, "bmx_bytes": directory_bytes(self.bmx)}

    def quant(self) -> dict:
        results = {}
        for method in self.args.quant_methods.split(","):
            flags = QUANT_RUNS[method]
            out = self.work / f"quant_{method}"
            shutil.rmtree(out, ignore_errors=True)
            # bmx.quant streams round-to-nearest methods layer by layer: one layer and its codes in memory.
            bmx = self.run(f"quant-{method}-bmx", [sys.executable, "-m", "bmx.quant", "--ckpt", self.bmx, *flags,
                                                    "--out", out, "--no-progress"], need_gb=4)
            bnb = self.child(f"quant-{method}-bnb", "bnb", self.base, out, method, need_gb=3)
            results[method] = {"bmx": bmx, "bnb": bnb, "bmx_bytes": directory_bytes(out / "params")}
            shutil.rmtree(out, ignore_errors=True)
        return results

    def awq(self) -> dict:
        calib = self.work / "pmc512"
        if not (calib / "manifest.json").is_file():
            self.run("awq-prepare", [sys.executable, "-m", "bmx.data", "prepare", ROOT.parent / "shared/data/pmc_oa",
                                     "--out", calib, "--seq-len", "512"])
        return self.child("awq-two-layers", "awq", self.bmx, calib, self.args.awq_samples, need_gb=8)

    def infer(self) -> dict:
        data = self.work / "eval_data"
        write_short_medqa(data, pool=12)
        common = [data, self.args.questions, self.args.new_tokens]
        need = self.model_gb() + 3
        bmx = self.child("infer-bmx", "infer-bmx", self.bmx, *common, need_gb=need)
        hf = self.child("infer-transformers", "infer-hf", self.base, *common, need_gb=need)
        return {"bmx": bmx, "transformers": hf, "agreement": compare_inference(bmx, hf)}

    def merge(self) -> dict:
        if not (self.tuned / "config.json").is_file():
            self.child("merge-inputs", "make-model", self.tuned, self.args.shape, self.args.layers or 0, "1")
        results = {}
        for name in self.args.merge_configs.split(","):
            config = self.work / f"{name}.yaml"
            text = (ROOT / "configs" / "merge" / f"{name}.yaml").read_text()
            layers = json.loads((self.base / "config.json").read_text())["num_hidden_layers"]
            text = text.replace(BASE_NAME, str(self.base)).replace(TUNED_NAME, str(self.tuned))
            config.write_text(text.replace("layer_range: [0, 32]", f"layer_range: [0, {layers}]"))
            ours, theirs, sample = (self.work / f"merge_{name}_{tool}" for tool in ("bmx", "mergekit", "sample"))
            for directory in (ours, theirs, sample):
                shutil.rmtree(directory, ignore_errors=True)
            bmx = self.run(f"merge-{name}-bmx", [sys.executable, "-m", "bmx.merge", config, ours, "--quiet"], need_gb=4)
            # Keep a fingerprint of every tensor and a few whole ones: two 7B outputs do not fit beside the inputs.
            self.child(f"merge-{name}-fingerprint", "fingerprint", ours, sample, self.base, self.tuned)
            shutil.rmtree(ours, ignore_errors=True)
            mergekit = self.run(f"merge-{name}-mergekit", [shutil.which("mergekit-yaml") or "mergekit-yaml", config,
                                                         theirs, "--lazy-unpickle", "--quiet"], need_gb=8)
            compare = (self.child(f"merge-{name}-compare", "compare-merge", theirs, sample, self.base, self.tuned)
                       if mergekit["exit_code"] == 0 else {})
            shutil.rmtree(theirs, ignore_errors=True), shutil.rmtree(sample, ignore_errors=True)
            results[name] = {"bmx": bmx, "mergekit": mergekit, "compare": compare}
        shutil.rmtree(self.tuned, ignore_errors=True)  # room for the conversion's two outputs
        return results


def available_gb() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024 / GB


def machine_state(directory: Path) -> dict:
    usage = shutil.disk_usage(directory)
    return {"load_average": os.getloadavg(), "available_memory_gb": available_gb(), "cpus": os.cpu_count(),
            "disk_free_gb": usage.free / GB, "time": time.strftime("%Y-%m-%d %H:%M")}


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file()) if Path(directory).exists() else 0


def write_short_medqa(directory: Path, pool: int) -> None:
    """The `pool` shortest MedQA test questions, so that 3-shot prompts (shots drawn from the same
    pool, never the question asked) stay short enough for 7B forwards on two CPU cores."""
    source = ROOT.parent / "shared/data/eval/medqa/US_4_options_phrases_no_exclude_test.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    records.sort(key=lambda r: len(r["question"]) + sum(len(o) for o in r["options"].values()))
    (directory / "medqa").mkdir(parents=True, exist_ok=True)
    with open(directory / "medqa" / source.name, "w") as out:
        out.writelines(json.dumps(record) + "\n" for record in records[:pool])


def compare_inference(bmx: dict, hf: dict) -> dict:
    if "letter_probs" not in bmx or "letter_probs" not in hf:
        return {}
    import numpy as np

    ours, theirs = np.array(bmx["letter_probs"]), np.array(hf["letter_probs"])
    same_ids = [a == b for a, b in zip(bmx["greedy_ids"], hf["greedy_ids"])]
    first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                        for a, b in zip(bmx["greedy_ids"], hf["greedy_ids"])]
    # At the first differing position both saw the same prefix: how far transformers' own logit for
    # bmx's token is below its choice (a near-tie when it is within bf16 rounding of the logits).
    margins = []
    for position, ours_ids in zip(first_difference, bmx["greedy_ids"]):
        if position is None or "greedy_top_logits" not in hf:
            margins.append(None)
            continue
        top_ids, top_values = hf["greedy_top_logits"][position]
        token = ours_ids[position]
        margins.append(top_values[0] - top_values[top_ids.index(token)] if token in top_ids else float("inf"))
    return {"max_abs_prob_difference": float(np.abs(ours - theirs).max()),
            "max_rel_prob_difference": float((np.abs(ours - theirs) / np.maximum(theirs, 1e-30)).max()),
            "same_predictions": bmx["predictions"] == hf["predictions"], "same_greedy_ids": all(same_ids),
            "first_differing_token": first_difference, "transformers_logit_margin_at_difference": margins}


# ---- children: the work of one process ----------------------------------------------------------

def child_make_model(directory, shape, layers, seed) -> dict:
    """Write the checkpoint tensor by tensor; seed 1 is the fine-tuned partner (seed 0's tensors + a delta)."""
    import ml_dtypes
    import numpy as np

    from bmx.convert.mistral_table import hf_tensor_order
    from bmx.convert.safetensors_io import (
        ShardedSafetensorsWriter,
        TensorSpec,
        atomic_output_dir,
        parse_size,
    )
    from bmx.model import MistralConfig
    from bmx.tokenizer import mistral_v01_model_path

    config_json = hf_config(shape, int(layers) or None)
    config = MistralConfig.from_hf(config_json)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = [TensorSpec(name, row.hf_shape, bf16) for name, row, _ in hf_tensor_order(config)]
    with atomic_output_dir(directory) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, parse_size("10GB"))  # v0.1's 9.94 GB + 4.54 GB
        for index, spec in enumerate(specs):
            rng = np.random.default_rng([0, index])
            values = rng.standard_normal(spec.shape, np.float32)
            scale = 0.1 if len(spec.shape) == 1 else config_json["initializer_range"]
            if int(seed):  # the partner: the base plus a tenth of its scale, as fine-tuning moves weights
                values += 0.1 * np.random.default_rng([int(seed), index]).standard_normal(spec.shape, np.float32)
            values *= scale
            if len(spec.shape) == 1:
                values += 1.0
            writer.write(spec.name, values.astype(bf16))
            del values
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        shutil.copy2(mistral_v01_model_path(), staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 32768}) + "\n")
        (staging / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}) + "\n")
    return {"tensors": len(specs), "bytes": sum(spec.nbytes for spec in specs)}


def child_read(directory) -> dict:
    import numpy as np

    from bmx.convert.safetensors_io import SafetensorsReader

    reader, total = SafetensorsReader(directory), 0
    for name in reader.names():
        total += np.array(reader.read(name)).nbytes  # a copy: every byte comes off the disk or page cache
    return {"bytes": total}


def child_disk_write(path, size) -> dict:
    """Sequential 64 MiB writes of `size` bytes, then removed: the rate this disk accepts data."""
    block, written = bytes(64 << 20), 0
    with open(path, "wb") as out:
        while written < int(size):
            written += out.write(block[: int(size) - written])
    os.remove(path)
    return {"bytes": written}


def child_compare_hf(original, back) -> dict:
    from bmx.convert.safetensors_io import SafetensorsReader

    a, b = SafetensorsReader(original), SafetensorsReader(back)
    if sorted(a.names()) != sorted(b.names()):
        raise SystemExit(f"{back}: tensors differ from {original}")
    differing = [name for name in a.names() if a.spec(name) != b.spec(name) or a.read(name).tobytes() != b.read(name).tobytes()]
    return {"tensors": len(a.names()), "bit_identical": len(a.names()) - len(differing), "differing": differing[:5]}


def child_bnb(hf_dir, quantized, method) -> dict:
    """bitsandbytes on every linear of the HF checkpoint (timed), each compared with bmx's stored arrays."""
    import bitsandbytes.functional as F
    import numpy as np
    import torch

    from bmx.convert.safetensors_io import SafetensorsReader
    from bmx.model.checkpoint import open_param
    from bmx.quant import bnb4
    from bmx.quant.model import LINEAR_PATHS

    torch.set_num_threads(os.cpu_count())
    reader, seconds, out_bytes, compared, identical, mismatches = SafetensorsReader(hf_dir), 0.0, 0, 0, 0, []
    identical_given_offset = 0
    layers = json.loads((Path(hf_dir) / "config.json").read_text())["num_hidden_layers"]
    stores = {}
    for layer in range(layers):
        for path in LINEAR_PATHS:
            start = time.perf_counter()
            weight = torch.from_numpy(np.array(reader.read(f"model.layers.{layer}.{path}.weight")).view(np.int16))
            weight = weight.view(torch.bfloat16)
            if method == "int8":
                codes, row_absmax, _ = F.int8_vectorwise_quant(weight)
                theirs = {"weight": codes, "scale": row_absmax}
            else:
                packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=method,
                                                compress_statistics=method == "nf4")
                theirs = {"packed": packed.reshape(-1), "absmax": state.absmax}
                if state.nested:
                    theirs.update(nested_absmax=state.state2.absmax, nested_offset=state.offset)
            seconds += time.perf_counter() - start
            out_bytes += sum(t.numel() * t.element_size() for t in theirs.values())
            compared += 1
            same = True
            for name, tensor in theirs.items():
                key = (*f"model.layers.{path}".split("."), name)
                if key not in stores:
                    stores[key] = open_param(quantized, key)
                ours = np.asarray(stores[key][layer].read().result())
                if name == "nested_offset":  # a float32 mean whose last bit follows torch's reduction order
                    same_name = abs(float(ours) - tensor.item()) <= 4 * np.spacing(np.float32(tensor.item()))
                else:
                    same_name = ours.tobytes() == tensor.numpy().tobytes()
                if not same_name and len(mismatches) < 5:
                    mismatches.append(f"layer {layer} {path} {name}")
                same &= same_name
            identical += int(same)
            if not same and "nested_offset" in theirs:
                # The offset is a float32 mean whose last bits follow torch's reduction order; every other
                # array follows from it. Quantized again from bnb's own offset, bmx must match exactly.
                again = bnb4.quantize_4bit(weight.float().numpy(), method, 64, double_quant=True,
                                           offset=np.float32(state.offset.item()))
                identical_given_offset += int(all(
                    np.asarray(getattr(again, name)).tobytes() == theirs[name].numpy().tobytes()
                    for name in ("packed", "absmax", "nested_absmax")))
            else:
                identical_given_offset += int(same)
    return {"bnb_quantize_seconds": seconds, "bnb_bytes": out_bytes, "linears": compared, "bit_identical": identical,
            "bit_identical_given_bnb_offset": identical_given_offset, "mismatches": mismatches}


def child_awq(ckpt, calib, samples) -> dict:
    """AWQ's search on the first two decoder layers of the checkpoint, with `samples` × 512 calibration tokens."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from bmx.model.checkpoint import open_param, read_config
    from bmx.model.mistral import Mistral
    from bmx.quant.awq import awq_quantize
    from bmx.quant.calibration import calibration_tokens
    from bmx.quant.schemes import make_scheme

    config = dataclasses.replace(read_config(ckpt), num_hidden_layers=2)
    # AWQ ranks candidates in float32 compute, as `python -m bmx.quant` runs it.
    graph, state = nnx.split(nnx.eval_shape(lambda: Mistral(config, dtype=jnp.float32, param_dtype=jnp.bfloat16)))
    params = state.to_pure_dict()

    def fill(node, keys=()):
        for key, value in node.items():
            if isinstance(value, dict):
                fill(value, (*keys, key))
            else:
                stored = open_param(ckpt, (*keys, key))
                node[key] = jnp.asarray((stored[:2] if "layers" in keys else stored).read().result())

    fill(params)
    state.replace_by_pure_dict(params)
    model = nnx.merge(graph, state)
    tokens = calibration_tokens(calib, int(samples), 512)
    start = time.perf_counter()
    awq_quantize(model, tokens, make_scheme("awq"), progress=False)
    seconds = time.perf_counter() - start
    full_layers, full_samples = read_config(ckpt).num_hidden_layers, 128
    per_layer = seconds / 2
    return {"samples": int(samples), "seconds_two_layers": seconds, "seconds_per_layer": per_layer,
            "extrapolated_per_layer_128_samples": per_layer * full_samples / int(samples),
            "extrapolated_model_128_samples": per_layer * full_samples / int(samples) * full_layers}


def inference_prompts(data_dir, questions: int, tokenizer):
    """The MedQA prompts bmx.eval builds (3-shot, shot set 1) as token ids, their letters' ids, and a generate prompt."""
    from bmx.eval.letter_protocol import encode_prompts, letter_token_ids, prompts_for
    from bmx.tasks.catalog import load_tasks, resolve_tasks
    from bmx.tasks.shots import ShotSampler

    (task,) = load_tasks(resolve_tasks("medqa", "en"), data_dir, "auto")
    asked = task.questions[: int(questions)]
    sampler = ShotSampler(task.shot_pool, 1)
    prompts = prompts_for(asked, [sampler.shots_for(q, 3) for q in asked])
    generate_prompt = tokenizer.encode("The most common cause of community-acquired pneumonia is", add_bos=True)
    return encode_prompts(tokenizer, prompts), letter_token_ids(tokenizer, asked[0].letters), generate_prompt, asked


def child_infer_bmx(ckpt, data_dir, questions, new_tokens) -> dict:
    import numpy as np

    from bmx.eval.engine import score_next_token
    from bmx.eval.models import load_eval_model
    from bmx.generate import GREEDY, generate_token_ids

    start = time.perf_counter()
    model = load_eval_model(ckpt)
    load_s = time.perf_counter() - start
    sequences, letter_ids, generate_prompt, asked = inference_prompts(data_dir, questions, model.tokenizer)

    def score():
        return score_next_token(model.scorer, sequences, [letter_ids] * len(sequences), progress=False)

    start = time.perf_counter()
    score()  # compiles the bucket shapes
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    logprobs, top, _ = score()
    prefill_s = time.perf_counter() - start
    generation_model = model.scorer.module()  # the same loaded parameters; no second copy
    times = {}
    for count in (1, int(new_tokens)):
        generate_token_ids(generation_model, [generate_prompt], max_new_tokens=count, sampling=GREEDY)  # compile
        start = time.perf_counter()
        ids = generate_token_ids(generation_model, [generate_prompt], max_new_tokens=count, sampling=GREEDY)
        times[count] = time.perf_counter() - start
    probs = np.exp(np.stack(logprobs).astype(np.float64))
    letter_of = dict(zip(letter_ids, asked[0].letters))
    return {"load_s": load_s, "first_score_s": first_s, "prefill_s": prefill_s,
            "prompt_tokens": sum(map(len, sequences)), "prefill_tokens_per_s": sum(map(len, sequences)) / prefill_s,
            "decode_tokens_per_s": (int(new_tokens) - 1) / (times[int(new_tokens)] - times[1]),
            "generate_s": times[int(new_tokens)], "letter_probs": probs.tolist(),
            "predictions": [letter_of.get(int(token)) for token in top],
            "greedy_ids": [list(map(int, ids[0].token_ids))]}


def child_infer_hf(hf_dir, data_dir, questions, new_tokens) -> dict:
    import numpy as np
    import torch
    from transformers import MistralForCausalLM

    from bmx.tokenizer import load_tokenizer

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    model = MistralForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    sequences, letter_ids, generate_prompt, asked = inference_prompts(data_dir, questions, load_tokenizer("mistral-v0.1"))
    probs, predictions = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for sequence in sequences:
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
            distribution = torch.softmax(logits, dim=-1)
            probs.append(distribution[letter_ids].double().numpy())
            top = int(torch.argmax(logits))
            predictions.append(asked[0].letters[letter_ids.index(top)] if top in letter_ids else None)
    prefill_s = time.perf_counter() - start
    times, ids = {}, None
    with torch.no_grad():
        for count in (1, int(new_tokens)):
            start = time.perf_counter()
            out = model.generate(torch.tensor([generate_prompt]), max_new_tokens=count, min_new_tokens=count,
                                 do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            times[count] = time.perf_counter() - start
            ids = out.sequences[0, len(generate_prompt):].tolist()
    # Each step's five most likely tokens and their logits: a differing greedy id can be shown a near-tie.
    top_steps = [torch.topk(scores[0].float(), 5) for scores in out.scores]
    top_logits = [[[int(i) for i in top.indices], [float(v) for v in top.values]] for top in top_steps]
    return {"load_s": load_s, "prefill_s": prefill_s, "prompt_tokens": sum(map(len, sequences)),
            "prefill_tokens_per_s": sum(map(len, sequences)) / prefill_s,
            "decode_tokens_per_s": (int(new_tokens) - 1) / (times[int(new_tokens)] - times[1]),
            "generate_s": times[int(new_tokens)], "letter_probs": np.array(probs).tolist(),
            "predictions": predictions, "greedy_ids": [ids], "greedy_top_logits": top_logits}


def sample_names(names: list[str], layers: int) -> set[str]:
    """Tensors kept whole for the merge comparison: embeddings, head, final norm, three layers."""
    keep = {f"model.layers.{layer}." for layer in (0, layers // 2, layers - 1)}
    return {n for n in names if not n.startswith("model.layers.") or any(n.startswith(k) for k in keep)}


def tensor_fingerprint(merged, base, tuned) -> dict:
    """Row sums of every row (to compare SLERP/TIES outputs everywhere) and, on every 16th row,
    DARE's kept fraction (entries moved off the base) and mean rescale of the kept task vector."""
    import numpy as np

    def rows(x):
        return np.asarray(x).reshape(np.asarray(x).shape[0], -1)

    merged_rows = rows(merged)
    as_float = merged_rows.astype(np.float32)
    row_sums, row_abs_sums = as_float.sum(axis=1, dtype=np.float64), np.abs(as_float).sum(axis=1, dtype=np.float64)
    del as_float
    merged_rows, base_rows, tuned_rows = (rows(x)[::16].astype(np.float32) for x in (merged, base, tuned))
    delta, moved = tuned_rows - base_rows, merged_rows - base_rows
    kept = moved != 0
    usable = kept & (delta != 0)
    return {"row_sums": row_sums.tolist(), "row_abs_sums": row_abs_sums.tolist(), "kept_fraction": float(kept.mean()),
            "rescale_mean": float((moved[usable] / delta[usable]).mean()) if usable.any() else 0.0}


def child_fingerprint(merged_dir, sample_dir, base_dir, tuned_dir) -> dict:
    import numpy as np

    from bmx.convert.safetensors_io import SafetensorsReader

    merged, base, tuned = (SafetensorsReader(d) for d in (merged_dir, base_dir, tuned_dir))
    layers = json.loads((Path(base_dir) / "config.json").read_text())["num_hidden_layers"]
    keep = sample_names(merged.names(), layers)
    Path(sample_dir).mkdir(parents=True)
    prints = {}
    for name in merged.names():
        prints[name] = tensor_fingerprint(merged.read(name), base.read(name), tuned.read(name))
        if name in keep:
            np.save(Path(sample_dir) / f"{name}.npy", np.asarray(merged.read(name)).view(np.uint16))
    (Path(sample_dir) / "fingerprints.json").write_text(json.dumps(prints))
    return {"tensors": len(prints), "kept_whole": len(keep)}


def child_compare_merge(theirs_dir, sample_dir, base_dir, tuned_dir) -> dict:
    """mergekit's output against bmx's: whole sampled tensors entry by entry, every tensor by fingerprint."""
    import ml_dtypes
    import numpy as np

    from bmx.convert.safetensors_io import SafetensorsReader

    theirs, base, tuned = (SafetensorsReader(d) for d in (theirs_dir, base_dir, tuned_dir))
    ours_prints = json.loads((Path(sample_dir) / "fingerprints.json").read_text())
    if sorted(ours_prints) != sorted(theirs.names()):
        raise SystemExit("bmx and mergekit wrote different tensors")
    largest, off, total, row_sum_rel, kept = 0.0, 0, 0, 0.0, {"bmx": [], "mergekit": []}
    rescale = {"bmx": [], "mergekit": []}
    for name in theirs.names():
        print_ = tensor_fingerprint(theirs.read(name), base.read(name), tuned.read(name))
        a, b = np.array(ours_prints[name]["row_sums"]), np.array(print_["row_sums"])
        scale = np.maximum(np.array(print_["row_abs_sums"]), 1e-30)  # a row sum can cancel to ~0: relative to Σ|x|
        row_sum_rel = max(row_sum_rel, float((np.abs(a - b) / scale).max()))
        for tool, fp in (("bmx", ours_prints[name]), ("mergekit", print_)):
            kept[tool].append(fp["kept_fraction"]), rescale[tool].append(fp["rescale_mean"])
        sample = Path(sample_dir) / f"{name}.npy"
        if sample.is_file():
            ours = np.load(sample).view(ml_dtypes.bfloat16).astype(np.float32)
            reference = np.asarray(theirs.read(name), np.float32)
            difference = np.abs(ours - reference)
            largest = max(largest, float(difference.max()))
            off += int(np.count_nonzero(difference > 2**-7 * np.abs(reference) + 1e-6))  # more than one bf16 step
            total += reference.size
    return {"sampled_entries": total, "largest_abs_difference": largest,
            "fraction_beyond_one_bf16_step": off / max(total, 1), "largest_row_sum_rel_difference": row_sum_rel,
            "kept_fraction": {t: float(np.mean(v)) for t, v in kept.items()},
            "rescale_mean": {t: float(np.mean(v)) for t, v in rescale.items()}}


CHILDREN = {"make-model": child_make_model, "read": child_read, "disk-write": child_disk_write,
            "compare-hf": child_compare_hf, "bnb": child_bnb, "awq": child_awq, "infer-bmx": child_infer_bmx,
            "infer-hf": child_infer_hf, "fingerprint": child_fingerprint, "compare-merge": child_compare_merge}


# ---- the table ----------------------------------------------------------------------------------

def fmt(value, digits=1, suffix=""):
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def ratio(ours, theirs):
    return None if not ours or not theirs else ours / theirs


def failed(result: dict) -> str | None:
    return None if result.get("exit_code", 0) == 0 else f"failed: {result.get('error', '')[:120]}"


def given_offset(bnb: dict) -> str:
    again = bnb.get("bit_identical_given_bnb_offset")
    if again is None or again == bnb.get("bit_identical"):
        return ""
    return f" ({again} / {bnb['linears']} from bnb's float32 offset)"


def near_tie(agreement: dict) -> str:
    positions, margins = agreement["first_differing_token"], agreement.get("transformers_logit_margin_at_difference")
    if all(p is None for p in positions):
        return ""
    text = f" (first differing position {positions[0] if len(positions) == 1 else positions}"
    if margins and margins[0] is not None:
        text += (f"; there transformers' logit for bmx's token is {margins[0]:.3g} below its own choice's"
                 if margins[0] != float("inf") else "; bmx's token is not in transformers' top 5 there")
    return text + ")"


def tables(results: dict) -> list[str]:
    lines = []
    if "convert" in results:
        convert = results["convert"]
        size, rows = convert["bytes"], convert["rows"]
        read_rate = size / rows["read"]["seconds"] / GB
        disk_rate = size / rows["disk-write"]["seconds"] / GB
        lines += [f"Conversion of {size / GB:.2f} GB of bf16 tensors (load {fmt(convert['machine']['load_average'][0])}):",
                  "", "| step | wall (s) | GB/s | × read | × plain disk write | peak RSS (GB) |", "|---|---:|---:|---:|---:|---:|"]
        for name, label in (("read", "read the safetensors (baseline)"), ("disk-write", "write as many bytes sequentially"),
                            ("hf-to-bmx", "hf-to-bmx"), ("bmx-to-hf", "bmx-to-hf")):
            rate = size / rows[name]["seconds"] / GB
            lines.append(f"| {label} | {fmt(rows[name]['seconds'])} | {rate:.3f} | {rate / read_rate:.2f} | "
                         f"{rate / disk_rate:.2f} | {rows[name]['peak_rss_gb']:.2f} |")
        compare = rows["compare"]
        lines += ["", f"Round trip: {compare.get('bit_identical')} of {compare.get('tensors')} tensors bit-identical.", ""]
    if "quant" in results:
        lines += [f"Quantization (load {fmt(results['quant']['machine']['load_average'][0])}):", "",
                  "| method | bmx wall (s) | bitsandbytes quantize (s) | × bnb | bmx peak RSS (GB) | bmx output (GB) | "
                  "bnb arrays (GB) | published (GB) | linears bit-identical |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, row in results["quant"].items():
            if method == "machine":
                continue
            bmx, bnb = row["bmx"], row["bnb"]
            published = PUBLISHED_BYTES.get(method)
            lines.append(f"| {method}{' + double quant' if method == 'nf4' else ''} | {failed(bmx) or fmt(bmx['seconds'])} | "
                         f"{failed(bnb) or fmt(bnb.get('bnb_quantize_seconds'))} | "
                         f"{fmt(ratio(bmx['seconds'], bnb.get('bnb_quantize_seconds')), 2)} | {bmx['peak_rss_gb']:.2f} | "
                         f"{row['bmx_bytes'] / GB:.2f} | {fmt((bnb.get('bnb_bytes') or 0) / GB, 2)} | "
                         f"{fmt(published and published / GB, 2)} | {bnb.get('bit_identical', '—')} / {bnb.get('linears', '—')}"
                         f"{given_offset(bnb)} |")
        lines.append("")
    if "awq" in results:
        awq = results["awq"]
        lines += [f"AWQ search on two 7B decoder layers with {awq.get('samples')} × 512 calibration tokens: "
                  f"{fmt(awq.get('seconds_two_layers'))} s (peak RSS {awq['peak_rss_gb']:.2f} GB). Extrapolated, "
                  f"linearly in tokens and layers, to AutoAWQ's 128 × 512: {fmt(awq.get('extrapolated_per_layer_128_samples'))}"
                  f" s per layer, {fmt((awq.get('extrapolated_model_128_samples') or 0) / 3600, 1)} h for the whole model "
                  "(an extrapolation, not a measurement).", ""]
    if "infer" in results:
        infer = results["infer"]
        bmx, hf, agreement = infer["bmx"], infer["transformers"], infer.get("agreement", {})
        lines += [f"Inference, bf16 weights, {len(bmx.get('letter_probs', []))} MedQA questions 3-shot "
                  f"({bmx.get('prompt_tokens')} prompt tokens) and {len(bmx.get('greedy_ids', [[]])[0])} greedy tokens "
                  f"(load {fmt(infer['machine']['load_average'][0])}):", "",
                  "| | bmx | transformers | bmx / transformers |", "|---|---:|---:|---:|"]
        for key, label, digits in (("peak_rss_gb", "peak RSS (GB)", 2), ("load_s", "load (s)", 1),
                                   ("prefill_tokens_per_s", "prefill tokens/s", 1),
                                   ("decode_tokens_per_s", "decode tokens/s", 2)):
            lines.append(f"| {label} | {failed(bmx) or fmt(bmx.get(key), digits)} | {failed(hf) or fmt(hf.get(key), digits)} | "
                         f"{fmt(ratio(bmx.get(key), hf.get(key)), 2)} |")
        if agreement:
            lines += ["", f"Letter probabilities: largest difference {agreement['max_abs_prob_difference']:.3g} "
                          f"(relative {agreement['max_rel_prob_difference']:.3g}); same predictions: "
                          f"{agreement['same_predictions']}; same greedy ids: {agreement['same_greedy_ids']}"
                          + near_tie(agreement) + "."]
        lines.append("")
    if "merge" in results:
        lines += [f"Merging (load {fmt(results['merge']['machine']['load_average'][0])}):", "",
                  "| config | bmx wall (s) | mergekit wall (s) | × mergekit | bmx peak RSS (GB) | mergekit peak RSS (GB) | "
                  "× mergekit | agreement |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name in MERGE_CONFIGS:
            row = results["merge"].get(name)
            if not row:
                continue
            bmx, kit, compare = row["bmx"], row["mergekit"], row["compare"]
            if compare and name == "dare":
                agreement = (f"kept fraction {compare['kept_fraction']['bmx']:.4f} vs {compare['kept_fraction']['mergekit']:.4f}, "
                             f"rescale {compare['rescale_mean']['bmx']:.3f} vs {compare['rescale_mean']['mergekit']:.3f}")
            elif compare:
                agreement = (f"sampled entries beyond one bf16 step: {compare['fraction_beyond_one_bf16_step']:.2e}; "
                             f"every row's sum within {compare['largest_row_sum_rel_difference']:.1e} of its Σ|x|")
            else:
                agreement = "—"
            lines.append(f"| {name} | {failed(bmx) or fmt(bmx['seconds'])} | {failed(kit) or fmt(kit['seconds'])} | "
                         f"{fmt(ratio(bmx['seconds'], kit['seconds']), 2)} | {bmx['peak_rss_gb']:.2f} | "
                         f"{kit['peak_rss_gb']:.2f} | {fmt(ratio(bmx['peak_rss_gb'], kit['peak_rss_gb']), 2)} | {agreement} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (debugging the bench)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "at_7b")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--merge-configs", default=",".join(MERGE_CONFIGS), help="subset of slerp,ties,dare")
    parser.add_argument("--quant-methods", default=",".join(QUANT_RUNS), help=f"subset of {','.join(QUANT_RUNS)}")
    parser.add_argument("--awq-samples", type=int, default=8, help="calibration sequences of 512 tokens for AWQ")
    parser.add_argument("--json", type=Path, default=None, help="write every raw figure here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return 0
    bench = Bench(args)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {','.join(STEPS)}")
    if sorted(set(args.quant_methods.split(",")) - set(QUANT_RUNS)):
        parser.error(f"--quant-methods {args.quant_methods}: choose from {','.join(QUANT_RUNS)}")
    print(f"workdir {bench.work}: {shutil.disk_usage(bench.work).free / GB:.0f} GB free disk, "
          f"{available_gb():.1f} GB available memory, load {os.getloadavg()[0]:.1f}", flush=True)
    for step in STEPS:
        if step in steps:
            print(f"== {step}", flush=True)
            bench.save(step, getattr(bench, step)())
    results = {p.stem: json.loads(p.read_text()) for p in sorted((bench.work / "results").glob("*.json"))}
    print()
    print(f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB "
          f"memory, shape {args.shape}{f' ({args.layers} layers)' if args.layers else ''}; load averages as each step "
          "ended (other jobs share the machine)\n")
    print("\n".join(tables(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
