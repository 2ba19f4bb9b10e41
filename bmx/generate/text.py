"""Text in, text out: `generate(model, tokenizer, prompts, ...)`, with stop strings and streaming.

Prompts are tokenized with BOS first (as `tokenizer(prompt)` gives them), sorted by length and run
in batches, so rows of a batch carry little padding; results come back in the prompts' order.
A row stops at EOS, at the first of `stop` strings in its generated text (the text is cut before
it), or after `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

from bmx.generate.loop import GREEDY, generate_token_ids
from bmx.generate.sampling import Sampling
from bmx.model.mistral import Mistral, unstack_layers
from bmx.tokenizer import Tokenizer

# Called with (prompt index, new text, finished): the generated text as it becomes final.
TextObserver = Callable[[int, str, bool], None]


@dataclass
class Generation:
    prompt: str
    token_ids: list[int]  # generated ids only
    text: str  # decoded generation, cut before the first stop string
    finish_reason: str  # "eos", "stop" or "length"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest occurrence of any stop string, and whether one occurred."""
    cuts = [index for index in (text.find(s) for s in stop if s) if index >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class TextStream:
    """Turns a growing list of token ids into text deltas that will not change any more.

    Text that could still become a stop string, and a trailing partial UTF-8 character (decoded
    as U+FFFD until its last byte arrives), are held back until they are resolved.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """(new final text, whether a stop string has appeared)."""
        text, stopped = cut_at_stop(self.tokenizer.decode(token_ids), self.stop)
        if stopped:
            return self.finish(text), True
        stable = len(text) - self.holdback
        while stable > self.emitted and text[stable - 1] == "\ufffd":
            stable -= 1
        if stable <= self.emitted:
            return "", False
        delta, self.emitted = text[self.emitted:stable], stable
        return delta, False

    def finish(self, final_text: str) -> str:
        delta, self.emitted = final_text[self.emitted:], len(final_text)
        return delta


def generate(model: Mistral, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256,
             sampling: Sampling = GREEDY, stop: Sequence[str] = (), seed: int = 0, batch_size: int = 8,
             on_text: TextObserver | None = None, truncate_prompts: bool = False) -> list[Generation]:
    """Generate a continuation of each prompt. Greedy unless `sampling` says otherwise; `seed` fixes sampling.
    A prompt with no room for `max_new_tokens` in the model's positions is an error, or with
    `truncate_prompts` loses its first tokens (`bmx.generate.loop.fit_positions`)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    encoded = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(prompts)]
    generations = generate_from_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                                    stop=stop, seed=seed, batch_size=batch_size, on_text=on_text,
                                    truncate_prompts=truncate_prompts)
    return [Generation(prompt, g.token_ids, g.text, g.finish_reason) for prompt, g in zip(prompts, generations)]


def _batch_observer(streams: list[TextStream], members: list[int], on_text: TextObserver | None):
    """`on_token` for one batch: row `row`'s ids so far → its stream (stopped?), new text → `on_text`."""

    def observe(row: int, token_ids: list[int]) -> bool:
        delta, stopped = streams[row].update(token_ids)
        if on_text is not None and (delta or stopped):
            on_text(members[row], delta, stopped)
        return stopped

    return observe


def generate_from_ids(model: Mistral, tokenizer: Tokenizer, prompt_ids: Sequence[Sequence[int]], *,
                      max_new_tokens: int = 256, sampling: Sampling = GREEDY, stop: Sequence[str] = (), seed: int = 0,
                      batch_size: int = 8, on_text: TextObserver | None = None,
                      truncate_prompts: bool = False) -> list[Generation]:
    """`generate` for prompts already tokenized (BOS included if wanted)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = unstack_layers(model)  # once for all the batches
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        streams = [TextStream(tokenizer, stop) for _ in members]
        generated = generate_token_ids(model, [prompt_ids[i] for i in members], max_new_tokens=max_new_tokens,
                                       eos_ids=[tokenizer.eos_id], sampling=sampling, seed=seed + start,
                                       on_token=_batch_observer(streams, members, on_text),
                                       truncate_prompts=truncate_prompts)
        for row, (index, output) in enumerate(zip(members, generated)):
            text, _ = cut_at_stop(tokenizer.decode(output.token_ids), stop)
            if on_text is not None and output.finish_reason != "stop":
                on_text(index, streams[row].finish(text), True)
            results[index] = Generation(tokenizer.decode(list(prompt_ids[index])), output.token_ids, text,
                                        output.finish_reason)
    return results
