"""bmx as an lm-eval-harness model: `--model bmx --model_args ckpt=DIR[,tokenizer=...,dtype=...]`.

Importing this module registers the model. lm-eval 0.4 finds third-party models only once they are
imported, so run it through `python -m bmx.eval.harness run --model bmx ...` (lm-eval's own CLI with
bmx registered) or `import bmx.eval.harness` before `lm_eval.simple_evaluate(model="bmx", ...)`, or
pass an instance: `lm_eval.simple_evaluate(model=BmxLM(ckpt=DIR), tasks=[...])`. bmx also declares
`BmxLM` under the `lm_eval.models` entry-point group (pyproject.toml), where lm-eval's releases after
0.4.x look for plugins.

Tokenization and scoring follow lm-eval's HF backend: BOS first (as the tokenizer adds it), the
same context/continuation split (inherited from `TemplateLM`), the same left truncation.
`generate_until` (tasks with `output_type: generate_until`) runs `bmx.generate` with the HF backend's
rules: requests grouped by their generation settings, contexts left-truncated to leave room for
`max_gen_toks`, EOS added to the stop strings, the text cut at the first stop string.
"""

from __future__ import annotations

import json

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_eval_utils
from tqdm.auto import tqdm

from bmx.eval.engine import DEFAULT_TOKENS_PER_BATCH
from bmx.eval.loglik_protocol import score_encoded


@register_model("bmx")
class BmxLM(TemplateLM):
    """lm-eval model over a bmx checkpoint (or an HF directory, converted on the fly)."""

    def __init__(self, ckpt: str | None = None, tokenizer: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
                 max_gen_toks: int = 256, batch_size=None, device=None, eval_model=None, **unused):
        # `batch_size`/`device` come from lm-eval's CLI for every model: bmx batches by tokens and uses
        # every local device, so they are accepted and ignored. `eval_model`: one already loaded.
        super().__init__()
        if unused:
            raise ValueError(f"--model_args for bmx: unknown argument(s) {sorted(unused)}; expected ckpt, tokenizer, "
                             "dtype, max_length, tokens_per_batch, max_gen_toks")
        if eval_model is None:
            if not ckpt:
                raise ValueError("--model_args for bmx: ckpt=DIR is required (a bmx checkpoint or HF directory)")
            from bmx.compile_cache import enable_compile_cache
            from bmx.eval.models import load_eval_model

            enable_compile_cache()  # built by lm-eval's CLI (model_args): a command, so cached like bmx's own

            eval_model = load_eval_model(ckpt, tokenizer=tokenizer, dtype=dtype,
                                         max_length=int(max_length) if max_length else None)
        self.eval_model = eval_model
        self.tokenizer = eval_model.tokenizer
        self.tokens_per_batch = int(tokens_per_batch)
        self.max_gen_toks = int(max_gen_toks)  # generation length when a task does not set one (lm-eval's default)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.eval_model.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        bos_text = self.tokenizer.id_to_piece(self.tokenizer.bos_id)
        add_bos = add_special_tokens if add_special_tokens is not None else not string.startswith(bos_text)
        tokens = self.tokenizer.encode(string, add_bos=add_bos)
        return tokens[-left_truncate_len:] if left_truncate_len else tokens

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        encoded = [(context, continuation) for _, context, continuation in requests]
        logliks, greedy = score_encoded(self.eval_model.scorer, encoded, tokens_per_batch=self.tokens_per_batch,
                                        progress=not disable_tqdm)
        results = [(float(ll), bool(g)) for ll, g in zip(logliks, greedy)]
        for (cache_key, _, _), result in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring in disjoint windows of `max_length`, as the HF backend does."""
        windows, owners = [], []
        for index, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            for window in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (loglik, _) in zip(owners, scores):
            totals[owner] += loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) generation with the HF backend's stop and truncation rules."""
        groups: dict[str, list[int]] = {}  # requests with the same generation settings run together
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        texts: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            contexts = [requests[i].args[0] for i in members]
            for index, text in zip(members, self._generate_group(contexts, requests[members[0]].args[1])):
                texts[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
            progress.update(len(members))
        progress.close()
        return texts

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from bmx.generate import GREEDY, Sampling, generate_from_ids

        settings = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(settings.pop("until", None), eos=self.tokenizer.id_to_piece(self.eot_token_id))
        max_new_tokens = settings.pop("max_gen_toks")
        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new_tokens} leaves no room for a context in max_length="
                             f"{self.max_length} tokens")
        sampling = GREEDY if not settings.get("do_sample") else Sampling(
            temperature=float(settings.get("temperature", 1.0)), top_k=int(settings.get("top_k") or 0),
            top_p=float(settings.get("top_p") or 1.0))
        prompt_ids = [self.tok_encode(context, left_truncate_len=self.max_length - max_new_tokens)
                      for context in contexts]
        rows = max(1, self.tokens_per_batch // (max(map(len, prompt_ids)) + max_new_tokens))
        generations = generate_from_ids(self.eval_model.scorer.module(), self.tokenizer, prompt_ids,
                                        max_new_tokens=max_new_tokens, sampling=sampling, stop=until,
                                        seed=int(settings.get("seed") or 0), batch_size=rows)
        return [postprocess_generated_text(g.text, until, think_end_token=None) for g in generations]
