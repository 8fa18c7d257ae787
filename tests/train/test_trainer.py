"""The trainer loop against first principles: accumulation, checkpointing, a plain reference loop, the NaN
guard and clear errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import FAST, ToyLoader

from llmlab.model import ModelConfig, Transformer
from llmlab.train import TrainConfig, Trainer, TrainingDiverged, generate, list_checkpoints, lm_loss
from llmlab.train.metrics import read_metrics, resolve_precision
from llmlab.train.state import prune_checkpoints


def nano(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("nano", **overrides))


def config(**kw):
    return TrainConfig(**{**FAST, "max_steps": 4, "warmup_steps": 0, "log_every": 1, "eval_every": 0,
                          "checkpoint_every": 1000, **kw})


class Halves:
    """The ToyLoader's batches, each split into two micro-batches (in order)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            half = batch["input_ids"].shape[0] // 2
            yield {k: v[:half] for k, v in batch.items()}
            yield {k: v[half:] for k, v in batch.items()}


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    # rows have different numbers of labelled tokens, so weighting micro-batches equally would be wrong
    big, small = nano(), nano()
    Trainer(big, ToyLoader(batch_size=8, mask_some=True), config(grad_clip=0.5), out_dir=tmp_path / "a").fit()
    Trainer(small, Halves(ToyLoader(batch_size=8, mask_some=True)), config(grad_clip=0.5, grad_accum_steps=2),
            out_dir=tmp_path / "b").fit()
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    a = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl", "train")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl", "train")]
    assert a == pytest.approx(b, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 512, (2, 48))
    grads = []
    for ckpt in (False, True):
        model = nano(gradient_checkpointing=ckpt).train()
        lm_loss(model, {"input_ids": x, "labels": x})[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_turns_gradient_checkpointing_on(tmp_path):
    model = nano()
    Trainer(model, ToyLoader(), config(max_steps=1, gradient_checkpointing=True), out_dir=tmp_path).fit()
    assert model.cfg.gradient_checkpointing


def test_same_loss_curve_as_a_plain_reference_loop(tmp_path):
    steps, lr, warmup = 8, 2e-3, 3
    ours, ref = nano(), nano()
    Trainer(ours, ToyLoader(), config(max_steps=steps, lr=lr, warmup_steps=warmup, schedule="cosine",
                                      min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0), out_dir=tmp_path).fit()
    ours_losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")]

    # the reference: logits + F.cross_entropy, AdamW with hand-made groups, the schedule written out, torch's
    # clip_grad_norm_
    decay = [p for n, p in ref.named_parameters() if p.dim() == 2 and "emb" not in n]
    rest = [p for n, p in ref.named_parameters() if not (p.dim() == 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    ref_losses, batches = [], iter(ToyLoader())
    for step in range(steps):
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * factor
        batch = next(batches)
        logits = ref(batch["input_ids"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    assert ours_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    # the two losses round differently (chunked vs full logits); Adam divides by √v, so on weights whose
    # gradients are tiny a last-bit difference moves the update by up to a few % of one step (lr = 2e-3)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = nano()
    calls = []

    def poisoned(m, batch):
        loss, metrics = lm_loss(m, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 7 else loss), metrics

    trainer = Trainer(model, ToyLoader(), config(max_steps=20, checkpoint_every=5), out_dir=tmp_path, loss_fn=poisoned)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: loss = nan.*step-00000005 \(step 5\)"):
        trainer.fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [5]
    from llmlab.io import load_checkpoint

    saved, _ = load_checkpoint(tmp_path / "checkpoints" / "step-00000005")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was never applied
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["kind"] == "diverged"
    # it resumes from there (and with a healthy loss runs to the end)
    result = Trainer(nano(), ToyLoader(), config(max_steps=8, checkpoint_every=5), out_dir=tmp_path).fit()
    assert result.resumed_from == 5 and result.steps == 8


def test_empty_training_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="training loader produced no batch"):
        Trainer(nano(), [], config(), out_dir=tmp_path).fit()


def test_sequence_longer_than_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="sequence length 200, above the model's max_seq_len=128"):
        Trainer(nano(), ToyLoader(seq_len=200), config(), out_dir=tmp_path).fit()


def test_existing_run_without_resume_is_an_error(tmp_path):
    Trainer(nano(), ToyLoader(), config(max_steps=2), out_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="already holds checkpoints.*train.resume=true"):
        Trainer(nano(), ToyLoader(), config(max_steps=4, resume=False), out_dir=tmp_path).fit()


def test_evaluation_perplexity_and_bits_per_byte(tmp_path):
    val = [next(iter(ToyLoader(seed=1)))]
    trainer = Trainer(nano(), ToyLoader(), config(max_steps=2), out_dir=tmp_path, val_batches=val,
                      val_bytes_per_token=3.5)
    result = trainer.fit()
    rec = read_metrics(tmp_path / "metrics.jsonl", "val")[-1]
    assert rec["step"] == 2 and rec["val_loss"] == result.val_loss
    assert rec["val_ppl"] == pytest.approx(math.exp(rec["val_loss"]))
    assert rec["val_bpb"] == pytest.approx(rec["val_loss"] / (math.log(2) * 3.5))  # nats/token -> bits/byte
    model = trainer.model.eval()
    with torch.no_grad():
        direct = lm_loss(model, val[0])[0].item()
    assert rec["val_loss"] == pytest.approx(direct, rel=1e-6)
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["best_step"] == 2 and summary["best_checkpoint"].endswith("step-00000002")


def test_keeps_the_newest_and_the_best_checkpoints(tmp_path):
    for step in (1, 2, 3, 4, 5):
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "training_state.json").write_text("{}")
    prune_checkpoints(tmp_path, keep_last=2, keep_steps={2})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_metrics_plot_and_mfu(tmp_path):
    result = Trainer(nano(), ToyLoader(), config(max_steps=3, plot=True), out_dir=tmp_path,
                     val_batches=[next(iter(ToyLoader(seed=1)))]).fit()
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["lr"] > 0 for r in train)
    assert result.plot_path and (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert result.tokens == 3 * 4 * 32 and result.tokens_per_s > 0


def test_backward_extent_follows_what_trains():
    from llmlab.peft import LoraConfig, add_lora
    from llmlab.train.metrics import backward_extent

    model = nano()
    assert backward_extent(model, 2) == {}  # everything trains: the plain 6·N count
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, LoraConfig(r=4, target_modules=[r"blocks\.1\.attn\.out"]))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora" in n and p.requires_grad)
    extent = backward_extent(model, 2)
    assert extent == {"first_trained_layer": 1, "trained_weights": lora} and lora > 0
    model.tok_emb.weight.requires_grad_(True)  # a trained embedding: gradients reach back to the input
    assert backward_extent(model, 2)["first_trained_layer"] == 0
    assert backward_extent(model, 2)["trained_weights"] == extent["trained_weights"]  # a table is no product


def test_bf16_autocast_runs_and_auto_precision_resolves(tmp_path):
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    result = Trainer(nano(), ToyLoader(), config(max_steps=2, precision="bf16"), out_dir=tmp_path).fit()
    assert math.isfinite(result.train_loss)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16").validate()


def test_generate_greedy_matches_the_full_forward():
    model = nano().eval()
    prompt = [5, 17, 42, 7]
    new = generate(model, prompt, max_new_tokens=6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert new == ids[len(prompt):]
    rng = torch.get_rng_state()
    generate(model, prompt, max_new_tokens=4, top_k=5, temperature=1.0)
    assert torch.equal(rng, torch.get_rng_state())  # sampling never moves the training RNG


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses(tmp_path):
    losses = []
    for compile_ in (False, True):
        Trainer(nano(), ToyLoader(), config(max_steps=3, compile=compile_), out_dir=tmp_path / str(compile_)).fit()
        losses.append([r["loss"] for r in read_metrics(tmp_path / str(compile_) / "metrics.jsonl", "train")])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
