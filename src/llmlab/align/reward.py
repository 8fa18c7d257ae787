"""Reward models and reward functions for RLHF.

RewardModel is our Transformer with a one-label classification head that reads the hidden state of the last real
token (left or right padding), trained with the Bradley-Terry loss on preference pairs (Ouyang et al. 2022).

A reward function is a callable `(prompts, completions, **kwargs) -> list[float]`, one score per completion: the
shape TRL's GRPO reward functions have. A prompt/completion is a string, or a list of chat messages
({"role", "content"}). kwargs carries the dataset's other columns per completion (e.g. `answer`) and is ignored
by the functions that need none. Every function has a `__name__`, which trainers log the rewards under.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.preference import encode_completion
from ..io.checkpoint import build_model, load_checkpoint, save_checkpoint
from ..model import ModelConfig, Transformer
from .losses import PreferenceLossOutput

RewardFn = Callable[..., list[float]]


# --- the reward model ------------------------------------------------------------------------------------------


def reward_config(cfg: ModelConfig) -> ModelConfig:
    """The config of a reward model on cfg's body: one score read at the last real token of a decoder (the one
    state that has seen the whole text), at [CLS] of an encoder (BERT's sequence-pair convention). No pooler, so
    the head is a single dim -> 1 projection like transformers' LlamaForSequenceClassification `score`."""
    pooling = "cls" if cfg.kind == "encoder" else "last"
    return ModelConfig.from_dict({**cfg.to_dict(), "head": "classification", "n_labels": 1, "pooling": pooling,
                                  "classifier_pooler": False, "classifier_dropout": 0.0})


class RewardModel(nn.Module):
    """r(x) = w·h_last(x): a scalar per sequence. `model` is a plain Transformer (head='classification',
    n_labels=1), so save/load are the ordinary llmlab checkpoint functions. The head bias stays frozen (at 0 for a
    new head): the Bradley-Terry loss cannot see a constant shift, and HF's `score` layer has no bias."""

    def __init__(self, model: Transformer | ModelConfig):
        super().__init__()
        if isinstance(model, ModelConfig):
            model = Transformer(reward_config(model))
            with torch.no_grad():
                model.head.proj.weight.normal_(0.0, 1 / math.sqrt(model.cfg.dim + 1))  # see from_policy
                model.head.proj.bias.zero_()
        cfg = model.cfg
        if cfg.head != "classification" or cfg.n_labels != 1:
            raise ValueError(f"a RewardModel needs a Transformer with head='classification' and n_labels=1, got "
                             f"head={cfg.head!r}, n_labels={cfg.n_labels}; build one with RewardModel(config) or "
                             "RewardModel.from_policy(policy)")
        self.model = model
        model.head.proj.bias.requires_grad_(False)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @classmethod
    def from_policy(cls, policy: Transformer, *, head_std: float | None = None) -> "RewardModel":
        """A reward model whose body is a copy of `policy`'s (same dtype and device), LM head dropped, and a new
        scalar head ~ N(0, head_std²), by default 1/sqrt(dim + 1) (Stiennon et al. 2020); head_std=0 gives zeros."""
        if not isinstance(policy, Transformer):
            raise TypeError(f"policy must be an llmlab Transformer, got {type(policy).__name__} (merge adapters first)")
        cfg = reward_config(policy.cfg)
        body = {k: v.detach().clone() for k, v in policy.state_dict().items() if not k.startswith("head.")}
        w = policy.tok_emb.weight
        std = 1 / math.sqrt(cfg.dim + 1) if head_std is None else head_std
        body["head.proj.weight"] = torch.randn(1, cfg.dim, device=w.device).mul_(std).to(w.dtype)
        body["head.proj.bias"] = torch.zeros(1, device=w.device, dtype=w.dtype)
        model = build_model(cfg, body, source="the policy", device=w.device)
        return cls(model.train(policy.training))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask [B, T] (1 = real token, padding on either side) -> scores [B]."""
        return self.model(input_ids, attention_mask).logits[:, 0]

    def save(self, path: str | Path, tokenizer: Any = None) -> Path:
        return save_checkpoint(self.model, path, tokenizer)

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = None,
             device: Any = "cpu") -> tuple["RewardModel", Any]:
        """(RewardModel in eval mode, tokenizer or None) from a directory written by save()."""
        model, tokenizer = load_checkpoint(path, dtype=dtype, device=device)
        return cls(model), tokenizer


# --- the Bradley-Terry loss ------------------------------------------------------------------------------------


@dataclass
class RewardLossOutput(PreferenceLossOutput):
    """Per-pair losses and the (detached) scores of the chosen and rejected replies."""

    def metrics(self) -> dict[str, float]:
        """Batch statistics under the names TRL's RewardTrainer logs (accuracy counts strict wins)."""
        both = torch.cat((self.chosen_rewards, self.rejected_rewards))
        diff = self.chosen_rewards - self.rejected_rewards
        return {"loss": self.loss.item(), "accuracy": (diff > 0).float().mean().item(),
                "margin": diff.mean().item(), "min_reward": both.min().item(), "mean_reward": both.mean().item(),
                "max_reward": both.max().item()}


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, *, margin: Tensor | float | None = None,
                       center_coef: float | None = None) -> RewardLossOutput:
    """Per pair: -log σ(r_c - r_r - m) (InstructGPT, Ouyang et al. 2022; the margin m as in Llama 2, Touvron et
    al. 2023), plus center_coef·(r_c + r_r)², which pulls the rewards towards zero mean (Eisenstein et al. 2023).
    The mean of the losses equals TRL's RewardTrainer loss with the same margin and center_rewards_coefficient."""
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected scores must both be [B]; got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return RewardLossOutput(losses, chosen.detach(), rejected.detach())


# --- batching text through a model -----------------------------------------------------------------------------


def _text(x: Any) -> str:
    """A completion/prompt as text: a string, or the content of the last message of a conversation."""
    if isinstance(x, str):
        return x
    if isinstance(x, Sequence) and x and isinstance(x[-1], Mapping):
        return str(x[-1].get("content") or "")
    raise TypeError(f"expected a string or a list of chat messages, got {type(x).__name__}")


def _is_chat(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(m, Mapping) for m in x)


@torch.no_grad()
def _run_batched(fn: Callable[[Tensor, Tensor], Tensor], model: nn.Module, ids: list[list[int]], batch_size: int,
                 max_length: int) -> Tensor:
    """fn(input_ids, attention_mask) over right-padded batches, in eval mode (restored after). Sequences longer
    than max_length keep the tokens the score is read from: the last ones where the model pools the last token,
    else the first ([CLS] of an encoder). Pad id 0 is masked out anyway."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cfg = getattr(model, "cfg", None)
    keep_end = cfg is None or cfg.pooling == "last"
    try:
        outs = []
        for i in range(0, len(ids), batch_size):
            # an empty text still gets a row
            rows = [(r[-max_length:] if keep_end else r[:max_length]) or [0] for r in ids[i:i + batch_size]]
            T = max(len(r) for r in rows)
            x = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
            outs.append(fn(x, mask).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0)
    finally:
        model.train(was_training)


class ModelReward:
    """A RewardModel as a reward function. Each (prompt, completion) is encoded with the reward model's own
    tokenizer (so the policy may use a different one) exactly as `llmlab rm` encoded its pairs
    (data.preference.encode_completion): through the tokenizer's chat template when it has one (a text prompt
    becomes one user message), else the prompt with the tokenizer's special tokens, then the completion and EOS
    (for BERT: [CLS] prompt [SEP] completion)."""

    __name__ = "model_reward"

    def __init__(self, reward_model: RewardModel, tokenizer: Any, *, batch_size: int = 16,
                 max_length: int | None = None):
        self.model, self.tokenizer, self.batch_size = reward_model, tokenizer, batch_size
        self.max_length = max_length or reward_model.cfg.max_seq_len

    def render(self, prompt: Any, completion: Any) -> list[int]:
        p, c = encode_completion(self.tokenizer, prompt, completion if _is_chat(completion) else _text(completion))
        return p + c

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        ids = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        return _run_batched(self.model, self.model, ids, self.batch_size, self.max_length).tolist()


class ClassifierReward:
    """A sequence classifier (Transformer with head='classification') as a reward function: the probability
    (output='prob') or the logit (output='logit') of class `label` for each completion's text (with the prompt
    in front when include_prompt), e.g. P(positive) from a sentiment classifier."""

    __name__ = "classifier_reward"

    def __init__(self, model: Transformer, tokenizer: Any, label: int, *, output: str = "prob",
                 include_prompt: bool = False, batch_size: int = 16, max_length: int | None = None):
        if model.cfg.head != "classification":
            raise ValueError(f"ClassifierReward needs a model with head='classification', got {model.cfg.head!r}")
        if not 0 <= label < model.cfg.n_labels:
            raise ValueError(f"label {label} is out of range for a classifier with n_labels={model.cfg.n_labels}")
        if output not in ("prob", "logit"):
            raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
        self.model, self.tokenizer, self.label, self.output = model, tokenizer, label, output
        self.include_prompt, self.batch_size = include_prompt, batch_size
        self.max_length = max_length or model.cfg.max_seq_len

    def _score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self.model(input_ids, attention_mask).logits.float()
        return (logits.softmax(-1) if self.output == "prob" else logits)[:, self.label]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = [(_text(p) if self.include_prompt else "") + _text(c)
                 for p, c in zip(prompts, completions, strict=True)]
        ids = [list(self.tokenizer.encode(t)) for t in texts]
        return _run_batched(self._score, self.model, ids, self.batch_size, self.max_length).tolist()


# --- rule-based rewards ----------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_NUMBERS = re.compile(_NUM)
_FRACTION = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")


def _to_number(s: str) -> float | None:
    """'3', '3.0', '1,000', '$5', '50%' -> a float; 'a/b' -> a/b; anything else None."""
    s = s.strip().rstrip(".").strip().removeprefix("$").removesuffix("%").strip()
    if frac := _FRACTION.match(s):
        den = float(frac[2].replace(",", ""))
        return float(frac[1].replace(",", "")) / den if den else None
    if not _NUMBERS.fullmatch(s):
        return None
    return float(s.replace(",", ""))


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _after_answer(text: str) -> str | None:
    found = re.findall(r"(?:answer\s*:|####)\s*([^\n]*)", text, flags=re.IGNORECASE)
    return found[-1].strip() if found else None


def _tag(text: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _last_number(text: str) -> str | None:
    found = _NUMBERS.findall(text)
    return found[-1] if found else None


def _auto(text: str) -> str | None:
    return next((x for f in (_boxed, _tag, _after_answer, _last_number) if (x := f(text)) is not None), None)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": _boxed, "tag": _tag, "answer": _after_answer, "last_number": _last_number, "auto": _auto}


def answers_match(predicted: str | None, reference: Any) -> bool:
    """Numbers compare numerically ('3.0' == '3', '1,000' == '1000'); a numeric reference matches the last
    number of a predicted phrase ('42 apples'). Other answers compare as text, case and spacing ignored."""
    if predicted is None:
        return False
    ref = str(reference)
    ref_num = _to_number(ref)
    if ref_num is not None:
        pred_num = _to_number(predicted)
        if pred_num is None and (last := _last_number(predicted)) is not None:
            pred_num = _to_number(last)
        return pred_num is not None and math.isclose(pred_num, ref_num, rel_tol=1e-9, abs_tol=1e-9)
    norm = lambda s: " ".join(s.strip().rstrip(".").split()).lower()  # noqa: E731
    return norm(predicted) == norm(ref)


def exact_answer_reward(answers: Mapping[str, Any] | None = None, *,
                        extract: str | Callable[[str], str | None] = "auto", column: str = "answer") -> RewardFn:
    """1.0 when a completion's final answer equals the reference answer of its prompt, else 0.0 (also when no
    answer is found). The reference comes from `answers` (prompt text, or a conversation's last message -> answer)
    or, without it, from the per-completion dataset column `column` that trainers pass as a keyword.
    extract: 'boxed' (last \\boxed{}), 'tag' (<answer>...</answer>), 'answer' (the line after 'Answer:' or
    '####'), 'last_number', 'auto' (the first of those that finds something), or a callable text -> str | None."""
    get = EXTRACTORS.get(extract) if isinstance(extract, str) else extract
    if not callable(get):
        raise ValueError(f"unknown extract {extract!r}; use one of {', '.join(EXTRACTORS)} or a callable")

    def exact_answer_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if answers is not None:
            missing = [_text(p) for p in prompts if _text(p) not in answers]
            if missing:
                raise KeyError(f"no reference answer for prompt {missing[0][:80]!r} ({len(missing)} missing)")
            refs = [answers[_text(p)] for p in prompts]
        elif column in kwargs:
            refs = kwargs[column]
        else:
            raise ValueError(f"exact_answer_reward needs the reference answers: pass answers= (prompt -> answer) "
                             f"or a dataset column {column!r}; got columns {sorted(kwargs)}")
        return [float(answers_match(get(_text(c)), r)) for c, r in zip(completions, refs, strict=True)]

    return exact_answer_reward


def format_reward(pattern: str, *, flags: int = re.DOTALL, search: bool = False) -> RewardFn:
    """1.0 when the whole completion (stripped) matches the regex `pattern` (or contains a match when search),
    e.g. r"<think>.*?</think>\\s*<answer>.*?</answer>" (the DeepSeek-R1 format reward), else 0.0."""
    rx = re.compile(pattern, flags)
    match = rx.search if search else rx.fullmatch

    def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [float(match(_text(c).strip()) is not None) for c in completions]

    return format_reward


def length_penalty(max_length: int, *, soft: int = 0, unit: str = "chars") -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025) on completion length L in chars or words:
    0 when L <= max_length - soft, (max_length - soft - L)/soft inside the soft zone, -1 beyond max_length."""
    if unit not in ("chars", "words") or not 0 <= soft < max_length:
        raise ValueError(f"need unit 'chars' or 'words' and 0 <= soft < max_length; got {unit!r}, soft={soft}")

    def length_penalty(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        out = []
        for c in completions:
            n = len(_text(c)) if unit == "chars" else len(_text(c).split())
            out.append(-1.0 if n > max_length else min(0.0, (max_length - soft - n) / soft) if soft else 0.0)
        return out

    return length_penalty


POSITIVE_WORDS = frozenset("""
good great excellent amazing wonderful fantastic awesome brilliant superb outstanding love loved lovely like
liked enjoy enjoyed happy glad pleased delighted joy beautiful perfect best better nice fine pleasant fun funny
charming delightful impressive remarkable incredible favorite fabulous terrific positive success successful
win winning kind friendly helpful recommend masterpiece gorgeous fresh exciting inspiring touching thrilling
""".split())

NEGATIVE_WORDS = frozenset("""
bad terrible awful horrible poor worst worse boring dull hate hated dislike disliked sad angry annoying annoyed
disappointing disappointed disappointment ugly stupid waste wasted mess messy broken fail failed failure
negative wrong painful pain weak lame mediocre nasty unpleasant tedious confusing useless pointless ridiculous
disgusting dreadful poorly miserable unhappy upset sloppy bland slow flawed regret
""".split())

_WORDS = re.compile(r"[a-z]+(?:'[a-z]+)?")


def lexicon_sentiment_reward(*, positive: frozenset[str] = POSITIVE_WORDS, negative: frozenset[str] = NEGATIVE_WORDS,
                             scale: str = "ratio") -> RewardFn:
    """A dependency-free sentiment score for the classic "make the policy positive" PPO demo: count lexicon words
    (lowercased, no negation handling: "not good" counts as positive).
    scale='ratio': (pos - neg) / max(1, words), in [-1, 1]; scale='tanh': tanh(pos - neg), which does not
    dilute with length (so it rewards long lists of positive words, the classic reward hack)."""
    if scale not in ("ratio", "tanh"):
        raise ValueError(f"scale must be 'ratio' or 'tanh', got {scale!r}")

    def lexicon_sentiment_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        out = []
        for c in completions:
            words = _WORDS.findall(_text(c).lower())
            diff = sum(w in positive for w in words) - sum(w in negative for w in words)
            out.append(diff / max(1, len(words)) if scale == "ratio" else math.tanh(diff))
        return out

    return lexicon_sentiment_reward


def combine_rewards(weighted: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """Σ weight·fn(prompts, completions). A None score (fn does not apply to that sample) counts as 0, as
    TRL's nansum over reward functions does."""
    if not weighted or not all(isinstance(x, tuple) and len(x) == 2 and callable(x[0])
                               and isinstance(x[1], (int, float)) for x in weighted):
        raise ValueError("combine_rewards takes a non-empty list of (reward function, weight) pairs")

    def combined_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in weighted:
            scores = fn(prompts, completions, **kwargs)
            if len(scores) != len(completions):
                raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(scores)} scores for "
                                 f"{len(completions)} completions")
            total = [t + w * s if s is not None else t for t, s in zip(total, scores)]
        return total

    return combined_reward


# --- tokenizer compatibility -----------------------------------------------------------------------------------

PROBES = ("Hello, world!", " The answer is 42.", "naïve café 東京 🙂", "\n\tdef f(x):\n\t\treturn x ** 2")


def _vocab(tok: Any) -> dict[str, int]:
    if callable(getattr(tok, "get_vocab", None)):  # transformers
        return dict(tok.get_vocab())
    if isinstance(getattr(tok, "vocab", None), Mapping):  # llmlab
        return dict(tok.vocab)
    raise TypeError(f"cannot read the vocabulary of a {type(tok).__name__}: it needs get_vocab() or .vocab")


def check_same_tokenizer(policy_tokenizer: Any, reward_tokenizer: Any) -> None:
    """Raise ValueError unless both tokenizers map the same tokens to the same ids and encode the probe texts
    alike, i.e. token ids from the policy can be fed to the reward model directly."""
    if policy_tokenizer is reward_tokenizer:
        return
    a, b = _vocab(policy_tokenizer), _vocab(reward_tokenizer)
    problem = None
    if len(a) != len(b):
        problem = f"vocab sizes differ: policy {len(a)}, reward model {len(b)}"
    elif a != b:
        diff = sorted((t for t in a.keys() | b.keys() if a.get(t) != b.get(t)), key=lambda t: (a.get(t, 1 << 62)))
        shown = ", ".join(f"{t!r}: {a.get(t)} vs {b.get(t)}" for t in diff[:3])
        problem = f"{len(diff)} tokens have different ids (policy vs reward model: {shown})"
    else:
        for text in PROBES:
            ia, ib = list(policy_tokenizer.encode(text)), list(reward_tokenizer.encode(text))
            if ia != ib:
                problem = f"the same vocab encodes {text!r} differently: {ia} vs {ib}"
                break
    if problem:
        raise ValueError(f"the reward model's tokenizer differs from the policy's: {problem}. Token ids from the "
                         "policy would mean other tokens to the reward model. Fix: use a reward model trained from "
                         "the same base model as the policy, or score text with ModelReward, which re-tokenizes "
                         "each prompt and completion with the reward model's own tokenizer.")
