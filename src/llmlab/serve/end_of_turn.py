"""End-of-turn tokens of common chat templates, the one list the server and `llmlab generate/chat` share.

A chat reply stops at them even when the tokenizer's eos is another token (a base model's tokenizer given a
chat template, say). This module imports nothing, so the CLI can use it without loading the web stack.
"""

from __future__ import annotations

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def end_of_turn_ids(tokenizer, eos_token_ids) -> list[int]:
    """Ids of the end-of-turn tokens in tokenizer's vocabulary that are not already among eos_token_ids."""
    ids = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS]
    return [i for i in ids if i is not None and i not in eos_token_ids]
