"""Reward models and reward functions (llmlab.align.reward): padding-invariant scores, a body copied exactly from a
policy, the Bradley-Terry loss against its formula and against TRL's RewardTrainer.compute_loss, a scorer that
transformers' LlamaForSequenceClassification reproduces, rule-based rewards on hand cases, tokenizer mismatch
errors, and a 30-step training run that learns a separable preference."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmlab.align.reward import (
    ClassifierReward,
    ModelReward,
    RewardModel,
    answers_match,
    bradley_terry_loss,
    check_same_tokenizer,
    combine_rewards,
    exact_answer_reward,
    format_reward,
    length_penalty,
    lexicon_sentiment_reward,
)
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train as train_tokenizer

NANO = ModelConfig.preset("nano")


def rand_params(model, seed=0):
    """Every parameter random (norm gains too), so a dropped or mis-read tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the reward head's bias stays frozen at 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(0)
    return rand_params(RewardModel(NANO)).eval()


@pytest.fixture(scope="module")
def tok():
    texts = ["The answer is 42. Hello world, this is a good day.", "user assistant system: what is 2 + 2?"] * 8
    t = train_tokenizer(texts, vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    t.chat_template = "chatml"
    return t


# --- the reward model ------------------------------------------------------------------------------------------


def test_scores_ignore_padding_side(rm):
    seqs = [torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    alone = torch.stack([rm(s[None])[0] for s in seqs])
    T = 9
    right = torch.stack([F.pad(s, (0, T - len(s))) for s in seqs])
    left = torch.stack([F.pad(s, (T - len(s), 0)) for s in seqs])
    rmask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long), (0, T - len(s))) for s in seqs])
    lmask = rmask.flip(1)
    assert rm(right, rmask).shape == (3,)
    torch.testing.assert_close(rm(right, rmask), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(rm(left, lmask), alone, atol=1e-5, rtol=0)


def test_from_policy_copies_the_body_and_not_the_storage():
    torch.manual_seed(1)
    policy = rand_params(Transformer(ModelConfig.preset("nano", tie_embeddings=True)), seed=3).eval()
    rm = RewardModel.from_policy(policy).eval()
    assert rm.cfg.head == "classification" and rm.cfg.n_labels == 1 and rm.cfg.pooling == "last"
    ids = torch.randint(0, 512, (2, 6))
    torch.testing.assert_close(rm.model(ids).hidden_states, policy(ids).hidden_states, atol=0, rtol=0)
    assert rm.model.head.proj.bias.item() == 0 and not rm.model.head.proj.bias.requires_grad
    std = rm.model.head.proj.weight.std().item()
    assert 0.5 / math.sqrt(65) < std < 2 / math.sqrt(65)  # N(0, 1/(dim+1)), Stiennon et al. 2020
    with torch.no_grad():
        rm.model.tok_emb.weight.add_(1.0)  # the copy is independent of the policy
    assert not torch.equal(rm.model.tok_emb.weight, policy.tok_emb.weight)
    assert torch.all(RewardModel.from_policy(policy, head_std=0.0)(ids) == 0)


def test_save_load_round_trip(rm, tmp_path, tok):
    rm.save(tmp_path / "rm", tokenizer=tok)
    back, tok2 = RewardModel.load(tmp_path / "rm")
    ids = torch.randint(0, 512, (2, 5))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), rm.state_dict().values()))
    torch.testing.assert_close(back(ids), rm(ids), atol=1e-6, rtol=0)
    assert tok2.vocab == tok.vocab
    with pytest.raises(ValueError, match="n_labels=1"):
        RewardModel(Transformer(NANO))


def test_transformers_llama_sequence_classification_gives_the_same_scores(rm):
    """llmlab.io.hf exports no Llama classification head yet; this maps the tensors by hand to show the reward
    model is exactly transformers' LlamaForSequenceClassification (num_labels=1, score without bias)."""
    transformers = pytest.importorskip("transformers")
    from llmlab.io.hf import config_to_hf, state_dict_to_hf

    lm_cfg = ModelConfig.from_dict({**rm.cfg.to_dict(), "head": "lm"})
    sd = {**rm.model.state_dict(), "head.proj.weight": torch.zeros(512, 64)}
    hf_sd = state_dict_to_hf(sd, lm_cfg)
    del hf_sd["lm_head.weight"]
    hf_sd["score.weight"] = rm.model.head.proj.weight
    hf_cfg = {**config_to_hf(lm_cfg), "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
              "pad_token_id": 0}
    hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**hf_cfg)).eval()
    hf.load_state_dict(hf_sd, strict=True)
    ids = torch.tensor([[5, 9, 200, 7, 0, 0], [3, 1, 4, 1, 5, 9]])  # right padding with pad id 0
    mask = (ids != 0).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(rm(ids, mask), theirs, atol=1e-5, rtol=0)


# --- the Bradley-Terry loss ------------------------------------------------------------------------------------


def test_bradley_terry_formula_metrics_and_gradients():
    c = torch.tensor([1.0, -0.5, 2.0, 0.3], requires_grad=True)
    r = torch.tensor([0.0, 0.5, -1.0, 0.3], requires_grad=True)
    m = torch.tensor([0.5, 0.0, 1.0, 0.2])
    out = bradley_terry_loss(c, r, margin=m, center_coef=0.01)
    d = (c - r - m).detach()
    want = torch.mean(-torch.log(torch.sigmoid(d)) + 0.01 * (c + r).detach() ** 2)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    g = -torch.sigmoid(-d) / 4  # d/dr_c of -log σ(d), per pair, averaged
    torch.testing.assert_close(c.grad, g + 0.02 * (c + r).detach() / 4)
    torch.testing.assert_close(r.grad, -g + 0.02 * (c + r).detach() / 4)
    metrics = out.metrics()
    assert metrics["accuracy"] == 0.5  # the tie (0.3, 0.3) is no win
    assert metrics["margin"] == pytest.approx((c - r).mean().item())
    assert metrics["min_reward"] == -1.0 and metrics["max_reward"] == 2.0
    assert not out.chosen_rewards.requires_grad
    with pytest.raises(ValueError, match=r"\[B\]"):
        bradley_terry_loss(c[None], r[None])


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01), (False, 0.1)])
def test_bradley_terry_matches_trl_reward_trainer(margin, center):
    """TRL's RewardTrainer.compute_loss, called unbound with a stub trainer and a model returning fixed logits."""
    trl_reward = pytest.importorskip("trl.trainer.reward_trainer")
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    inputs = {"input_ids": torch.ones(12, 4, dtype=torch.long), "attention_mask": torch.ones(12, 4, dtype=torch.long)}
    m = torch.rand(6, generator=g) if margin else None
    if margin:
        inputs["margin"] = m
    logits = torch.cat((chosen, rejected))[:, None]  # TRL: the batch is [chosen; rejected], logits [2B, 1]
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list)})
    theirs = trl_reward.RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs)
    ours = bradley_terry_loss(chosen, rejected, margin=m, center_coef=center)
    torch.testing.assert_close(ours.loss, theirs, atol=1e-6, rtol=1e-6)
    logged, metrics = stub._metrics["train"], ours.metrics()
    for name in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert metrics[name] == pytest.approx(logged[name][0], abs=1e-6), name


def test_training_learns_a_separable_preference():
    """Chosen sequences contain token 5, rejected ones do not: 30 steps of Bradley-Terry training separate them
    on held-out pairs. Only the parameters with requires_grad get gradients (the frozen head bias does not)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        rej = torch.randint(10, 100, (n, 8), generator=g)
        cho = torch.randint(10, 100, (n, 8), generator=g)
        cho[torch.arange(n), torch.randint(0, 8, (n,), generator=g)] = 5
        return cho, rej

    rm = RewardModel(NANO).train()
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=3e-3)
    for step in range(30):
        cho, rej = pairs(32)  # 16 pairs per batch is noisy across seeds; 32 reaches >= 0.99 on seeds 0-5
        scores = rm(torch.cat((cho, rej)))
        out = bradley_terry_loss(*scores.chunk(2))
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            assert rm.model.head.proj.bias.grad is None
            assert all(p.grad is not None for n, p in rm.named_parameters() if p.requires_grad), "a dead parameter"
        opt.step()
    rm.eval()
    cho, rej = pairs(200)
    with torch.no_grad():
        acc = bradley_terry_loss(rm(cho), rm(rej)).metrics()["accuracy"]
    assert acc > 0.9, acc


# --- model-based reward functions ------------------------------------------------------------------------------


def test_encoder_reward_model_reads_cls_and_keeps_the_start_of_long_texts(tok):
    enc = ModelConfig.from_dict({**NANO.to_dict(), "kind": "encoder", "head": "none", "position": "learned",
                                  "n_token_types": 2})
    torch.manual_seed(0)
    rm = rand_params(RewardModel(enc)).eval()
    assert rm.cfg.pooling == "cls" and RewardModel(NANO).cfg.pooling == "last"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    scorer = ModelReward(rm, plain, max_length=8)
    ids = scorer.render("What is 2 + 2?", " The answer is 42. Hello world, this is a good day.")
    assert len(ids) > 8
    with torch.no_grad():
        assert scorer(["What is 2 + 2?"], [" The answer is 42. Hello world, this is a good day."])[0] == \
            pytest.approx(rm(torch.tensor([ids[:8]])).item(), abs=1e-5)  # [CLS] ... the first 8 tokens


def test_model_reward_renders_batches_and_restores_mode(rm, tok):
    prompts = ["What is 2 + 2?", "Hello", "A much longer prompt about the world and a good day"]
    completions = [" 4", " world, this is good", ""]
    scorer = ModelReward(rm, tok, batch_size=2)
    chat = [[{"role": "user", "content": p}] for p in prompts]
    got = scorer(chat, completions)
    for p, c, s in zip(chat, completions, got):
        ids = tok.apply_chat_template(p + [{"role": "assistant", "content": c}])
        assert s == pytest.approx(rm(torch.tensor([ids])).item(), abs=1e-5)
    # a text prompt is one user message, as `llmlab rm` encoded it in training
    assert scorer(prompts, completions) == pytest.approx(got, abs=1e-6)
    # without a chat template: the prompt with the tokenizer's specials, the completion, then EOS
    plain = copy.deepcopy(tok)
    plain.chat_template, plain.eos_token = None, "<|endoftext|>"
    eos = plain.token_to_id("<|endoftext|>")
    with torch.no_grad():
        want = [rm(torch.tensor([plain.encode(p) + plain.encode(c, add_special_tokens=False) + [eos]])).item()
                for p, c in zip(prompts, completions)]
    assert ModelReward(rm, plain)(prompts, completions) == pytest.approx(want, abs=1e-5)
    # conversational completions (a list of messages) render the same
    assert scorer(chat, [[{"role": "assistant", "content": c}] for c in completions]) == pytest.approx(got)
    rm.train()
    scorer(prompts, completions)
    assert rm.training
    rm.eval()


def test_classifier_reward(tok):
    torch.manual_seed(2)
    clf = rand_params(Transformer(ModelConfig.preset("nano", head="classification", n_labels=3, pooling="last")))
    texts = ["good day", "bad day, terrible", "the answer is 42"]
    probs = [ClassifierReward(clf, tok, label)([""] * 3, texts) for label in range(3)]
    assert [sum(p) for p in zip(*probs)] == pytest.approx([1.0] * 3)
    logits = ClassifierReward(clf, tok, 1, output="logit")(["x"] * 3, texts)
    with torch.no_grad():
        want = [clf(torch.tensor([tok.encode(t)])).logits[0, 1].item() for t in texts]
    assert logits == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        ClassifierReward(clf, tok, 3)


# --- rule-based reward functions -------------------------------------------------------------------------------


def test_exact_answer_reward():
    fn = exact_answer_reward({"q1": "3", "q2": "1000", "q3": "Paris", "q4": "0.5"})
    prompts = ["q1", "q1", "q1", "q2", "q3", "q3", "q4", "q1", "q1"]
    completions = ["so x = 3.0", "Answer: 3 apples\nbye", "I think 4", "The total is 1,000.", "Answer: paris.",
                   "Answer: Lyon", "\\boxed{1/2}", "no idea", "the result is \\boxed{3} (not 4)"]
    assert fn(prompts, completions) == [1, 1, 0, 1, 1, 0, 1, 0, 1]
    assert fn.__name__ == "exact_answer_reward"
    # the reference as a dataset column passed by the trainer; a conversation's last message is the completion
    col = exact_answer_reward(extract="boxed")
    assert col(["a", "b", "c"], ["\\boxed{\\frac{1}{2}}", [{"role": "assistant", "content": "\\boxed{7}"}], "7"],
               answer=["\\frac{1}{2}", "7.00", "7"]) == [1, 1, 0]
    tag = exact_answer_reward(extract="tag")
    assert tag(["a", "a"], ["<think>2+2</think><answer> 4 </answer>", "4"], answer=["4", "4"]) == [1, 0]
    assert exact_answer_reward(extract="last_number")(["a"], ["#### -2.50"], answer=["-2.5"]) == [1]
    assert exact_answer_reward(extract="answer")(["a"], ["steps...\n#### 72"], answer=["72"]) == [1]
    with pytest.raises(ValueError, match="column 'answer'"):
        col(["a"], ["1"])
    with pytest.raises(KeyError, match="no reference answer"):
        fn(["q9"], ["1"])
    with pytest.raises(ValueError, match="unknown extract"):
        exact_answer_reward(extract="nope")
    assert answers_match("3.0", 3) and answers_match("$5", "5") and answers_match("50%", "50")
    assert not answers_match(None, "3") and not answers_match("three", "3")


def test_format_length_lexicon_and_combined():
    fmt = format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>")
    good = "<think>\nlet me see\n</think>\n<answer>4</answer>\n"
    assert fmt(["p"] * 3, [good, "<answer>4</answer>", good + " extra"]) == [1.0, 0.0, 0.0]
    assert format_reward(r"<answer>", search=True)(["p"], ["x <answer>4</answer>"]) == [1.0]

    pen = length_penalty(10, soft=4)
    assert pen(["p"] * 4, ["a" * 6, "a" * 8, "a" * 10, "a" * 11]) == [0.0, -0.5, -1.0, -1.0]
    assert length_penalty(3, unit="words")(["p"] * 2, ["one two three", "one two three four"]) == [0.0, -1.0]

    senti = lexicon_sentiment_reward()
    assert senti(["p"] * 4, ["A great, wonderful day!", "This was awful and boring.", "The cat sat.", ""]) == \
        pytest.approx([0.5, -0.4, 0.0, 0.0])  # 2 of 4 words, 1 of 5
    assert lexicon_sentiment_reward(scale="tanh")(["p"], ["good good good bad"]) == pytest.approx([math.tanh(2)])

    none_for_b = lambda prompts, completions, **kw: [None if c == "b" else 1.0 for c in completions]  # noqa: E731
    both = combine_rewards([(senti, 2.0), (none_for_b, 0.5), (exact_answer_reward(), 1.0)])
    # "good 3": sentiment 1/1 ("3" is no word), 1.0 from the second function, the answer 3 is right
    assert both(["p", "p"], ["good 3", "b"], answer=["3", "3"]) == pytest.approx([2 * 1.0 + 0.5 + 1, 0.0])
    with pytest.raises(ValueError, match="pairs"):
        combine_rewards([senti])


# --- tokenizer compatibility -----------------------------------------------------------------------------------


def test_check_same_tokenizer(tok):
    check_same_tokenizer(tok, tok)
    same = train_tokenizer(["The answer is 42. Hello world, this is a good day.",
                            "user assistant system: what is 2 + 2?"] * 8, vocab_size=300,
                           special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    check_same_tokenizer(tok, same)  # an equal tokenizer, another object
    other = train_tokenizer(["completely different text about rivers and mountains"] * 8, vocab_size=280,
                            special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    with pytest.raises(ValueError, match="vocab sizes differ: policy 300, reward model") as e:
        check_same_tokenizer(tok, other)
    assert "same base model" in str(e.value) and "ModelReward" in str(e.value)
    shuffled = SimpleNamespace(vocab={t: (i + 1) % tok.vocab_size for t, i in tok.vocab.items()},
                               encode=tok.encode)
    with pytest.raises(ValueError, match="tokens have different ids"):
        check_same_tokenizer(tok, shuffled)
