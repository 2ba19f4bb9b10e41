"""Text generation with a rolling KV cache: `generate(model, tokenizer, prompts, ...)`.

`bmx.generate.generate_token_ids` is the token-level loop underneath (lists of ids in, ids out);
`python -m bmx.generate` is the command line.
"""

from bmx.generate.loop import GREEDY, TokenGeneration, generate_token_ids
from bmx.generate.sampling import Sampling, filter_logits
from bmx.generate.text import Generation, generate, generate_from_ids
from bmx.model.kv_cache import KVCache

__all__ = ["generate", "generate_from_ids", "generate_token_ids", "Generation", "TokenGeneration", "Sampling",
           "GREEDY", "filter_logits", "KVCache"]
