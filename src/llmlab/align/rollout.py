"""Rollouts for online RL (PPO, GRPO): sample completions of prompts from the current policy with the inference
engine (infer.LLM: continuous batching, paged KV cache), then lay them out as a training batch.

    roll = Rollouts(policy, tokenizer, max_tokens=64, temperature=1.0)
    batch = roll.sample(prompts, n=4, seed=step)     # n completions per prompt, grouped: prompt 0's first
    batch.input_ids, batch.attention_mask, batch.completion_mask, batch.texts, batch.group

The engine runs the policy's own modules (a LoRA adapter patched in place is used as it is), so each call
samples from the weights as they are now. Prefix caching is off: cached blocks would hold keys and values of
weights that have since changed. The policy is put back in the mode it was in.

Rows are [prompt | completion | padding] (right-padded, as align.logprobs and the DPO batches read them), the
completion keeps its end-of-sequence token when it stopped on one (so the policy is trained to stop), and
per-token quantities live on input_ids[:, 1:] positions with mask target_mask(...) (see align.logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..infer import LLM, SamplingParams
from .pairs import completion_rows, pad_id_of


@dataclass
class RolloutBatch:
    prompts: list  # the prompt of each row (a string or chat messages), repeated n times
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]  # completion text (stop strings and end-of-sequence removed)
    finish_reasons: list[str]  # "stop" or "length"
    group: torch.Tensor  # [N] which prompt a row answers (rows of one prompt are adjacent)
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 on completion tokens

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device) -> RolloutBatch:
        for name in ("group", "input_ids", "attention_mask", "completion_mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "completion_mask": self.completion_mask}


class Rollouts:
    def __init__(self, policy, tokenizer, *, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, chat_template: str | None = None, stop: Sequence[str] = (),
                 max_num_seqs: int = 64):
        if tokenizer is None:
            raise ValueError("rollouts need the policy's tokenizer")
        if temperature <= 0:
            raise ValueError(f"rollout temperature must be > 0 (RL samples; 0 would be greedy), got {temperature}")
        self.policy, self.tokenizer, self.chat_template = policy, tokenizer, chat_template
        self.params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           stop=list(stop))
        self.pad_id = pad_id_of(tokenizer)
        self.max_num_seqs = max_num_seqs

    def encode_prompt(self, prompt) -> list[int]:
        """A chat prompt (messages, or a string as one user message) through the chat template with the
        generation prompt; without a template, the string itself (with the tokenizer's special tokens)."""
        tok = self.tokenizer
        if tok.chat_template is not None or self.chat_template is not None:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return list(tok.apply_chat_template(messages, add_generation_prompt=True, chat_template=self.chat_template))
        if not isinstance(prompt, str):
            raise ValueError("chat-message prompts need a chat template; the tokenizer has none")
        return list(tok.encode(prompt))

    @torch.no_grad()
    def sample(self, prompts: Sequence, *, n: int = 1, seed: int | None = None) -> RolloutBatch:
        was = self.policy.training
        llm = LLM(self.policy, self.tokenizer, prefix_caching=False, max_num_seqs=self.max_num_seqs)
        try:
            ids = [self.encode_prompt(p) for p in prompts]
            params = [SamplingParams(n=n, seed=None if seed is None else seed * 100_003 + i, **self.params)
                      for i in range(len(ids))]
            outs = llm.generate(ids, params)
        finally:
            self.policy.train(was)
        rows_prompt, rows_completion, texts, reasons, group, which = [], [], [], [], [], []
        for i, (p, out) in enumerate(zip(ids, outs)):
            for c in sorted(out.outputs, key=lambda c: c.index):
                completion = list(c.token_ids)
                if not completion:  # nothing sampled (max_tokens hit at once): score the EOS-less empty reply
                    completion = [self.pad_id]
                rows_prompt.append(p)
                rows_completion.append(completion)
                texts.append(c.text)
                reasons.append(c.finish_reason)
                group.append(i)
                which.append(prompts[i])
        t = completion_rows([p + c for p, c in zip(rows_prompt, rows_completion)], [len(p) for p in rows_prompt], self.pad_id)
        device = next(self.policy.parameters()).device
        return RolloutBatch(which, rows_prompt, rows_completion, texts, reasons, torch.tensor(group),
                            t["input_ids"], t["attention_mask"], t["completion_mask"]).to(device)
