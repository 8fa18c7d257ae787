"""Exact resume: a run killed (SIGKILL, in a subprocess) and started again ends with the same weights and the
same loss log as a run that was never interrupted; a kill in the middle of writing a checkpoint leaves the
previous one intact."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import FAST, ToyLoader, nano_overrides

from llmlab.io import load_checkpoint
from llmlab.model import ModelConfig, Transformer
from llmlab.train import TrainConfig, Trainer, list_checkpoints
from llmlab.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "pretrain" / "nano.yaml"

# Runs the pretrain workflow; "loss N" SIGKILLs the process in its N-th loss call (mid-step: after some
# forward passes, before the backward), "save N" right after the N-th checkpoint's weights are written
# (before its training state and the rename).
SCRIPT = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
import llmlab.train.pretraining as P
import llmlab.train.state as S
from llmlab.train import PretrainConfig, load_recipe

mode, n, recipe, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
count = [0]
if mode == "loss":
    real_loss = P.lm_loss
    def lm_loss(model, batch):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(model, batch)
    P.lm_loss = lm_loss
elif mode == "save":
    real_write = S.write_safetensors
    def write_safetensors(*args, **kwargs):
        files = real_write(*args, **kwargs)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return files
    S.write_safetensors = write_safetensors
P.pretrain(load_recipe(PretrainConfig, recipe, overrides))
'''


def run(tmp, corpus, out, mode="none", n=0):
    script = tmp / "run_pretrain.py"
    script.write_text(SCRIPT)
    overrides = nano_overrides(corpus, out, **{"train.eval_at_start": True})
    return subprocess.run([sys.executable, str(script), mode, str(n), str(RECIPE), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def loss_log(out):
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(out / "metrics.jsonl")
            if r["kind"] in ("train", "val")]


def assert_same_weights(a, b):
    ma, _ = load_checkpoint(a)
    mb, _ = load_checkpoint(b)
    for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus):
    tmp = tmp_path_factory.mktemp("reference")
    done = run(tmp, tiny_corpus, tmp / "run")
    assert done.returncode == 0, done.stderr
    return tmp / "run"


@pytest.mark.parametrize("when", ["random", "before the first checkpoint"])
def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path, tiny_corpus, reference, when):
    # loss calls: the validation batches at step 0, then one per step and the validation batches every 4 steps
    n = random.Random(os.urandom(8)).randint(6, 30) if when == "random" else 4
    out = tmp_path / "run"
    killed = run(tmp_path, tiny_corpus, out, "loss", n)
    assert killed.returncode == -9, f"kill at loss call {n}: {killed.stderr[-2000:]}"
    assert not (out / "final").exists()
    resumed = run(tmp_path, tiny_corpus, out)
    assert resumed.returncode == 0, resumed.stderr
    saved = list_checkpoints(out / "checkpoints")
    assert saved and saved[-1][0] == 16
    assert loss_log(out) == loss_log(reference), f"killed at loss call {n}"
    assert_same_weights(out / "final", reference / "final")


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_corpus, reference):
    out = tmp_path / "run"
    killed = run(tmp_path, tiny_corpus, out, "save", 2)  # the first save is step 3's: die inside the next one
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [3]
    assert any(p.name.startswith(".step-") and ".tmp-" in p.name for p in ckpts.iterdir())  # half-written, hidden
    assert_same_weights(ckpts / "step-00000003", reference / "checkpoints" / "step-00000003")
    resumed = run(tmp_path, tiny_corpus, out)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 3
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # the leftover was cleaned up
    assert loss_log(out) == loss_log(reference)
    assert_same_weights(out / "final", reference / "final")


class Stop(Exception):
    pass


def test_resume_in_process_restores_everything(tmp_path):
    """The same property without subprocesses, with dropout on (the torch RNG matters) and a toy loader."""
    def fresh():
        torch.manual_seed(0)
        return Transformer(ModelConfig.preset("nano", dropout=0.1))

    cfg = TrainConfig(**{**FAST, "max_steps": 10, "warmup_steps": 2, "log_every": 3, "checkpoint_every": 4,
                         "eval_every": 5})
    val = [next(iter(ToyLoader(seed=1)))]
    full = fresh()
    Trainer(full, ToyLoader(), cfg, out_dir=tmp_path / "full", val_batches=val).fit()

    def stop_at_7(trainer):
        if trainer.step == 7:
            raise Stop

    with pytest.raises(Stop):
        Trainer(fresh(), ToyLoader(), cfg, out_dir=tmp_path / "cut", val_batches=val, hooks=[stop_at_7]).fit()
    resumed = fresh()
    result = Trainer(resumed, ToyLoader(), cfg, out_dir=tmp_path / "cut", val_batches=val).fit()
    assert result.resumed_from == 5  # checkpoints at 4 and at 5 (a new best validation loss)
    assert loss_log(tmp_path / "cut") == loss_log(tmp_path / "full")
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
