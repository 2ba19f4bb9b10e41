"""The evaluation tasks themselves: their questions, the readers of the authors' files, the prompt
formats and the few-shot selection, shared by `bmx.eval` (which scores models on them) and `bmx.data`'s
SFT builder (which turns their train splits into fine-tuning examples).

`catalog` is the registry of the ten tasks (`TASKS`, groups, suites, `load_task`).
"""
