"""The DPO-family preference losses: parity with TRL 1.16 (the oracle), hand-computed formulas, input errors.

TRL oracles used:
- DPO sigmoid / IPO / hinge / robust / sigmoid_norm and KTO: the real DPOTrainer / KTOTrainer on a tiny Llama in
  float64 (their losses live inside compute_loss). We compute the completion log-probs with a plain forward and
  check that our loss on them equals the loss and the logged metrics TRL reports, per batch and per example.
- cDPO: TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid", so the oracle is CPOTrainer.cpo_loss
  (the same smoothed logistic loss) fed the DPO log-ratios.
- CPO, SimPO, ORPO: CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss and their get_batch_loss_metrics, called
  unbound on a stand-in `self` whose forward returns our random log-probs.
"""

import copy
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llmlab.align.losses import (
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

F64 = torch.float64
# TRL's fused LM head returns float32 per-token log-probs even for a float64 model; ours come from float64 logits
TRAINER_TOL = {"rtol": 1e-5, "atol": 1e-5}


def rand_dpo_inputs(b=16, seed=0, dtype=F64):
    """Summed log-probs of a policy and a reference that disagree by a few nats."""
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(b, generator=g, dtype=dtype) * 50 - 5, -torch.rand(b, generator=g, dtype=dtype) * 50 - 5
    rc, rr = pc + 3 * torch.randn(b, generator=g, dtype=dtype), pr + 3 * torch.randn(b, generator=g, dtype=dtype)
    return pc, pr, rc, rr


def rand_avg_logps(b=16, seed=0, dtype=F64):
    """Per-token averages spanning both branches of log(1 - exp(x)) (x above and below -log 2)."""
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(b, generator=g, dtype=dtype) * 3 - 1e-3, -torch.rand(b, generator=g, dtype=dtype) * 3 - 1e-3)


def assert_metrics(ours: dict, trl: dict, keys, **tol):
    for k in keys:
        ours_k, trl_k = torch.tensor(ours[k], dtype=F64), torch.tensor(trl[k], dtype=F64)
        assert_close(ours_k, trl_k, msg=lambda m, k=k: f"{k}: {m}", **tol)


# --- the tiny real trainers ------------------------------------------------------------------------------------


WORDS = "a b c d e f g h i j k l m n o p".split()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_pair(seed=0, swap=False):
    """A random tiny Llama and a noisy copy of it (sharper, so lower log-probs on our data): the policy is the noisy
    one and the reference the original, or the other way round when `swap`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    policy = LlamaForCausalLM(cfg).to(F64)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return (ref, policy) if swap else (policy, ref)


@torch.no_grad()
def completion_logps(model, input_ids, attention_mask, completion_mask):
    """Summed completion log-probs and completion lengths, by a plain forward over the full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:]
    return sequence_logps(token, mask), mask.sum(-1)


PREF_DATA = {
    "prompt": ["a b c", "d e", "f g h i", "j", "k l m", "n"],
    "chosen": [" k l", " m", " n o p", " a b c d", " e f", " g"],
    "rejected": [" p", " o n m", " l", " k j", " h", " i j k l"],
}
TRL_DPO_TYPES = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2), ("sigmoid_norm", 0.0)]


@pytest.mark.parametrize(("trl_type", "eps"), TRL_DPO_TYPES)
def test_dpo_matches_trl_dpo_trainer(tmp_path, tokenizer, trl_type, eps):
    from datasets import Dataset

    policy, ref = tiny_pair(seed=1)
    b, beta = len(PREF_DATA["prompt"]), 0.3
    # bf16=False: TRL defaults to bf16 autocast, which would round the reference's log-probs
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta,
                     loss_type=[trl_type], label_smoothing=eps, per_device_train_batch_size=b, max_length=64)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_dict(PREF_DATA),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))  # rows: b chosen then b rejected
    policy_logps, lengths = completion_logps(trainer.model, batch["input_ids"], batch["attention_mask"],
                                             batch["completion_mask"])
    ref_logps, _ = completion_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"],
                                    batch["completion_mask"])
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    lc, lr = lengths.chunk(2)
    ours_type = "sigmoid" if trl_type == "sigmoid_norm" else trl_type
    use_lengths = trl_type in ("ipo", "sigmoid_norm")
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=ours_type, label_smoothing=eps,
                   chosen_lengths=lc if use_lengths else None, rejected_lengths=lr if use_lengths else None)

    trl_loss = trainer.compute_loss(trainer.model, batch).detach()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert_close(out.loss, trl_loss.to(F64), **TRAINER_TOL)
    assert_metrics(out.metrics(), trl_metrics, ["rewards/chosen", "rewards/rejected", "rewards/margins",
                                                 "rewards/accuracies"], **TRAINER_TOL)
    same_logps = {"logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}  # TRL's log-probs are ours
    assert_metrics(same_logps, trl_metrics, ["logps/chosen", "logps/rejected"], **TRAINER_TOL)
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # the policy and the reference genuinely differ

    for i in range(b):  # per example: a batch of one pair
        one = {k: v[[i, b + i]] for k, v in batch.items()}
        assert_close(out.losses[i], trainer.compute_loss(trainer.model, one).detach().to(F64), **TRAINER_TOL)
        trl_one = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        ours_one = {"rewards/chosen": out.chosen_rewards[i].item(), "rewards/rejected": out.rejected_rewards[i].item()}
        assert_metrics(ours_one, trl_one, ["rewards/chosen", "rewards/rejected"], **TRAINER_TOL)


KTO_DATA = {
    "prompt": ["a b c", "d e", "f g h i", "j", "k l", "m"],
    "completion": [" k l", " m", " n o p", " a b c d", " e", " f g"],
    "label": [True, False, False, True, False, True],
}


@pytest.mark.parametrize("swap", [False, True])  # KL estimate below 0 (clamped) and above 0
def test_kto_matches_trl_kto_trainer(tmp_path, tokenizer, swap):
    from datasets import Dataset

    policy, ref = tiny_pair(seed=2, swap=swap)
    beta, wd, wu = 0.3, 1.5, 0.7
    args = KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta,
                     desirable_weight=wd, undesirable_weight=wu, per_device_train_batch_size=len(KTO_DATA["prompt"]),
                     max_length=64)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_dict(KTO_DATA),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    main = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    mismatched = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    policy_logps, _ = completion_logps(trainer.model, *main)
    ref_logps, _ = completion_logps(trainer.ref_model, *main)
    kl = kto_kl(completion_logps(trainer.model, *mismatched)[0], completion_logps(trainer.ref_model, *mismatched)[0])
    out = kto_loss(policy_logps, ref_logps, batch["label"].bool(), kl, beta=beta, desirable_weight=wd,
                   undesirable_weight=wu)

    trl_loss = trainer.compute_loss(trainer.model, batch).detach()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert_close(out.loss, trl_loss.to(F64), **TRAINER_TOL)
    assert_metrics(out.metrics(), trl_metrics, ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins"],
                   **TRAINER_TOL)
    assert (trl_metrics["kl"] > 0) == swap  # both sides of the clamp are exercised


# --- reference-free losses against TRL's loss methods on a stand-in trainer ------------------------------------


def stand_in(trainer_cls, loss_method, chosen, rejected, **attrs):
    """A `self` for TRL's CPO/ORPO loss code: its forward returns our log-probs, gathers are identities."""
    self = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, **attrs)
    zeros = torch.zeros(1, dtype=chosen.dtype)
    self.concatenated_forward = lambda model, batch: (chosen, rejected, zeros, zeros, torch.tensor(0.0))
    setattr(self, loss_method, types.MethodType(getattr(trainer_cls, loss_method), self))
    return self


def trl_cpo(chosen, rejected, **attrs):
    """(losses, chosen_rewards, rejected_rewards, logged loss, logged metrics) from TRL's CPOTrainer code."""
    attrs = {"alpha": 0.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5, "label_smoothing": 0.0} | attrs
    self = stand_in(CPOTrainer, "cpo_loss", chosen, rejected, **attrs)
    losses, cr, rr = self.cpo_loss(chosen, rejected)
    loss, metrics = CPOTrainer.get_batch_loss_metrics(self, None, {})
    return losses, cr, rr, loss, metrics


PAIR_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cpo_matches_trl_cpo_loss(eps):
    c, r = rand_dpo_inputs(seed=3)[:2]
    out = cpo_loss(c, r, beta=0.05, label_smoothing=eps)
    losses, cr, rr, loss, metrics = trl_cpo(c, r, loss_type="sigmoid", beta=0.05, label_smoothing=eps)
    assert_close(out.losses, losses)
    assert_close((out.chosen_rewards, out.rejected_rewards), (cr, rr))
    assert_close(out.loss, loss)
    assert_metrics(out.metrics(), metrics, PAIR_KEYS)


@pytest.mark.parametrize(("beta", "ratio", "eps"), [(2.0, 0.5, 0.0), (2.5, 0.3, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_simpo(beta, ratio, eps):
    c, r = rand_avg_logps(seed=4)
    out = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    # TRL's simpo_gamma is the margin γ itself; SimPO's gamma_beta_ratio is γ/β
    losses, cr, rr, loss, metrics = trl_cpo(c, r, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta,
                                            label_smoothing=eps)
    assert_close(out.losses, losses)
    assert_close((out.chosen_rewards, out.rejected_rewards), (cr, rr))
    assert_close(out.loss, loss)
    assert_metrics(out.metrics(), metrics, PAIR_KEYS)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_matches_trl_smoothed_sigmoid(eps):
    pc, pr, rc, rr = rand_dpo_inputs(seed=5)
    out = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=eps)
    # TRL 1.16's DPOTrainer has no cDPO; its CPO loss is the same smoothed logistic loss, here on the log-ratios
    losses, cr, rrw, loss, metrics = trl_cpo(pc - rc, pr - rr, loss_type="sigmoid", beta=0.2, label_smoothing=eps)
    assert_close(out.losses, losses)
    assert_close((out.chosen_rewards, out.rejected_rewards), (cr, rrw))
    assert_metrics(out.metrics(), metrics, PAIR_KEYS)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl_odds_ratio_loss(beta):
    c, r = rand_avg_logps(seed=6, dtype=torch.float32)  # TRL computes ORPO in float32
    out = orpo_loss(c, r, beta=beta)
    self = stand_in(ORPOTrainer, "odds_ratio_loss", c, r, beta=beta)
    trl_losses, cr, rr, _, _ = self.odds_ratio_loss(c, r)
    assert_close(out.losses, -trl_losses)  # TRL returns β·log σ(·) and subtracts its mean from the NLL
    assert_close((out.chosen_rewards, out.rejected_rewards), (cr, rr))
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(self, None, {})  # its NLL is 0 here
    assert_close(out.loss, loss)
    assert_metrics(out.metrics(), metrics, PAIR_KEYS + ["log_odds_ratio", "log_odds_chosen"], rtol=1e-6, atol=1e-6)


# --- formulas by hand ------------------------------------------------------------------------------------------


def scalars(*xs, dtype=F64):
    return [torch.tensor([x], dtype=dtype) for x in xs]


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    pc, pr = rand_dpo_inputs(seed=7)[:2]
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.7)
    assert_close(out.losses, torch.full_like(pc, math.log(2)))
    m = out.metrics()
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/margins"] == 0
    assert m["rewards/accuracies"] == 0  # ties are not wins


def test_dpo_variants_by_hand():
    # chosen log-ratio 6 over 3 tokens, rejected -4 over 2: h = 10, per token 2 - (-2) = 4
    pc, pr, rc, rr = scalars(-10.0, -20.0, -16.0, -16.0)
    lc, lr = scalars(3.0, 2.0)
    beta = 0.1
    sig = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert_close(sig.losses, scalars(math.log1p(math.exp(-1.0)))[0])
    assert_close((sig.chosen_rewards, sig.rejected_rewards), tuple(scalars(0.6, -0.4)))
    eps = 0.2
    cdpo = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert_close(cdpo.losses, scalars((1 - eps) * math.log1p(math.exp(-1)) + eps * math.log1p(math.exp(1)))[0])
    ipo = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    assert_close(ipo.losses, scalars((4 - 1 / (2 * beta)) ** 2)[0])
    assert_close(ipo.chosen_rewards, scalars(0.6)[0])  # rewards stay on the summed log-ratios
    assert_close(dpo_loss(pc, pr, rc, rr, beta=0.05, loss_type="hinge").losses, scalars(0.5)[0])
    assert_close(dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="hinge").losses, scalars(0.0)[0])
    robust = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    expected = ((1 - eps) * math.log1p(math.exp(-1)) - eps * math.log1p(math.exp(1))) / (1 - 2 * eps)
    assert_close(robust.losses, scalars(expected)[0])


def test_zero_smoothing_and_beta_scaling():
    pc, pr, rc, rr = rand_dpo_inputs(seed=8)
    h = (pc - rc) - (pr - rr)
    for beta in (0.05, 0.1, 1.0):
        out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.0)
        assert_close(out.losses, -F.logsigmoid(beta * h))
        assert_close(out.chosen_rewards, beta * (pc - rc))
        robust0 = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust")
        assert_close(robust0.losses, out.losses)
    ones = torch.ones_like(pc)  # already-averaged inputs: lengths of one change nothing
    normalized = dpo_loss(pc, pr, rc, rr, chosen_lengths=ones, rejected_lengths=ones)
    assert_close(normalized.losses, dpo_loss(pc, pr, rc, rr).losses)


def test_reference_free_losses_by_hand():
    c, r = scalars(math.log(0.5), math.log(0.25))  # odds 1 and 1/3: log odds ratio log 3
    out = orpo_loss(c, r, beta=0.1)
    assert_close(out.losses, scalars(0.1 * math.log(4 / 3))[0])
    assert_close(out.log_odds_ratio, scalars(math.log(3))[0])
    simpo = simpo_loss(*scalars(-1.0, -1.0), beta=2.0, gamma_beta_ratio=0.5)  # equal averages: -log σ(-γ), γ=1
    assert_close(simpo.losses, scalars(math.log1p(math.e))[0])
    assert_close(cpo_loss(*scalars(-3.0, -5.0), beta=0.5).losses, scalars(math.log1p(math.exp(-1)))[0])


def test_orpo_log_odds_are_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -5.0, -40.0], dtype=F64)
    exact = torch.tensor([xi - math.log(-math.expm1(xi)) for xi in x.tolist()], dtype=F64)
    out = orpo_loss(x, torch.full_like(x, -2.0))
    rejected_log_odds = -2.0 - math.log(-math.expm1(-2.0))
    assert_close(out.log_odds_ratio, exact - rejected_log_odds)
    x.requires_grad_(True)
    orpo_loss(x, torch.full_like(x, -2.0)).loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad < 0).all()


def test_gradients_push_chosen_up_and_rejected_down():
    def grads(fn, *xs):
        xs = [x.clone().requires_grad_(True) for x in xs]
        fn(*xs).loss.backward()
        return [x.grad for x in xs]

    pc, pr, rc, rr = rand_dpo_inputs(b=8, seed=9)
    lengths = torch.full_like(pc, 4.0)
    for loss_type in ("sigmoid", "ipo", "robust"):
        kw = {"chosen_lengths": lengths, "rejected_lengths": lengths} if loss_type == "ipo" else {}
        g = grads(lambda a, b_: dpo_loss(a, b_, rc, rr, loss_type=loss_type, **kw), pc, pr)
        assert (g[0] < 0).all() and (g[1] > 0).all(), loss_type
    c, r = rand_avg_logps(b=8, seed=10)
    for fn in (simpo_loss, orpo_loss, cpo_loss):
        g = grads(fn, c, r)
        assert (g[0] < 0).all() and (g[1] > 0).all(), fn.__name__
    desirable = torch.tensor([True, False] * 4)
    logps = pc.clone().requires_grad_(True)
    kl = torch.tensor(0.3, dtype=F64, requires_grad=True)
    kto_loss(logps, rc, desirable, kl).loss.backward()
    assert (logps.grad[desirable] < 0).all() and (logps.grad[~desirable] > 0).all()
    assert kl.grad is None  # the reference point carries no gradient


def test_kto_by_hand():
    logps, ref = torch.tensor([-5.0, -5.0], dtype=F64), torch.tensor([-6.0, -7.0], dtype=F64)  # r = 1, 2
    desirable = torch.tensor([True, False])
    out = kto_loss(logps, ref, desirable, torch.tensor(0.5, dtype=F64), beta=0.5, desirable_weight=2.0,
                   undesirable_weight=0.5)
    sig = torch.sigmoid
    expected = torch.stack([2.0 * (1 - sig(torch.tensor(0.5 * 0.5))), 0.5 * (1 - sig(torch.tensor(0.5 * (0.5 - 2.0))))])
    assert_close(out.losses, expected.to(F64))
    assert_close(out.rewards, torch.tensor([0.5, 1.0], dtype=F64))
    negative = kto_loss(logps, ref, desirable, torch.tensor(-3.0, dtype=F64), beta=0.5)
    zero = kto_loss(logps, ref, desirable, torch.tensor(0.0, dtype=F64), beta=0.5)
    assert_close(negative.losses, zero.losses)  # the reference point is clamped at 0
    m = kto_loss(logps, ref, torch.tensor([True, True]), torch.tensor(0.0, dtype=F64)).metrics()
    assert "rewards/rejected" not in m and "rewards/margins" not in m
    assert_close(kto_kl(*scalars(-3.0, -4.0)), torch.tensor(1.0, dtype=F64))


def test_sequence_logps_sum_and_mean():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    assert_close(sequence_logps(tok, mask), torch.tensor([-5.0, 0.0]))
    assert_close(sequence_logps(tok, mask, average=True), torch.tensor([-2.5, 0.0]))  # empty: 0, not NaN


# --- bad input -------------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    pc, pr, rc, rr = rand_dpo_inputs(b=4)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*" + ", ".join(DPO_LOSS_TYPES)):
        dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    for beta in (0.0, -0.1):
        for call in (lambda: dpo_loss(pc, pr, rc, rr, beta=beta), lambda: simpo_loss(pc, pr, beta=beta),
                     lambda: cpo_loss(pc, pr, beta=beta), lambda: orpo_loss(pc, pr, beta=beta),
                     lambda: kto_loss(pc, rc, pc > -30, torch.tensor(0.0), beta=beta)):
            with pytest.raises(ValueError, match="beta must be > 0"):
                call()
    for eps in (-0.1, 0.5, 0.7):
        for call in (lambda: dpo_loss(pc, pr, rc, rr, label_smoothing=eps),
                     lambda: simpo_loss(pc, pr, label_smoothing=eps), lambda: cpo_loss(pc, pr, label_smoothing=eps)):
            with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
                call()
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="both"):
        dpo_loss(pc, pr, rc, rr, chosen_lengths=torch.ones(4))
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc, pr, rc, rr, chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(4))
    with pytest.raises(ValueError, match="<= 0"):
        orpo_loss(torch.tensor([0.1, -1.0]), torch.tensor([-1.0, -1.0]))
    with pytest.raises(ValueError, match="bool"):
        kto_loss(pc, rc, torch.ones(4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(pc, rc, pc > -30, torch.zeros(4))
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(pc, rc[:2], pc > -30, torch.tensor(0.0))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        kto_loss(pc, rc, pc > -30, torch.tensor(0.0), desirable_weight=-1.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 4))
