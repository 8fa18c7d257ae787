"""Parameter groups, learning-rate schedules and the checkpoint state codec."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from llmlab.model import ModelConfig, Transformer
from llmlab.train import Schedule, build_optimizer, parameter_groups
from llmlab.train.state import decode, encode, rng_state, set_rng_state


@pytest.mark.parametrize("tied", [False, True])
def test_weight_decay_only_on_linear_matrices(tied):
    model = Transformer(ModelConfig.preset("nano", tie_embeddings=tied, qkv_bias=True))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - {id(model.tok_emb.weight)}
    assert {id(p) for p in decay["params"]} == linear
    no = {id(p) for p in no_decay["params"]}
    assert id(model.tok_emb.weight) in no  # embeddings (and a head tied to them)
    assert all(id(m.weight) in no for m in model.modules() if "Norm" in type(m).__name__)
    assert id(model.blocks[0].attn.qkv.bias) in no  # biases
    # every trainable parameter exactly once (a tied head is the embedding table)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_frozen_parameters_are_left_out_and_all_frozen_is_an_error():
    model = Transformer(ModelConfig.preset("nano"))
    model.tok_emb.weight.requires_grad_(False)
    ids = {id(p) for g in parameter_groups(model, 0.1) for p in g["params"]}
    assert id(model.tok_emb.weight) not in ids
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3)


def test_the_fused_adamw_takes_the_same_steps_as_the_reference_loop():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano"))
    reference = copy.deepcopy(model)
    opt = build_optimizer(model, lr=1e-2)
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 512, (2, 16))
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(x, labels=x).loss.backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedules():
    warm = Schedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [warm(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])  # (step + 1) / warmup
    assert warm(10) == pytest.approx(1.0)
    assert warm(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert warm(110) == pytest.approx(0.1) and warm(500) == pytest.approx(0.1)
    lin = Schedule("linear", total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5)
    wsd = Schedule("wsd", total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [wsd(s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert wsd(89) == pytest.approx(0.5) and wsd(99) == pytest.approx(0.0)
    assert Schedule("constant", total_steps=10, warmup_steps=2)(9) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        Schedule("cosin")


def test_schedule_sets_each_group_from_its_peak():
    model = Transformer(ModelConfig.preset("nano"))
    opt = build_optimizer(model, lr=1e-3)
    Schedule("cosine", total_steps=10, warmup_steps=4).apply(opt, 1)
    assert all(g["lr"] == pytest.approx(0.5e-3) for g in opt.param_groups)


def test_state_codec_round_trip():
    random.seed(3)
    np.random.seed(4)
    state = {"a": (1, 2.5, "x", None, True), 3: [torch.arange(4), np.arange(3, dtype=np.uint32)],
             "nested": {"t": torch.tensor(1.5), "rng": rng_state()}}
    tensors = {}
    data = encode(state, tensors)
    back = decode(data, tensors)
    assert back["a"] == (1, 2.5, "x", None, True) and isinstance(back["a"], tuple)
    assert torch.equal(back[3][0], torch.arange(4))
    assert back[3][1].dtype == np.uint32 and back[3][1].tolist() == [0, 1, 2]
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(back["nested"]["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_optimizer_state_round_trips_through_the_codec():
    model = Transformer(ModelConfig.preset("nano"))
    opt = build_optimizer(model, lr=1e-3)
    x = torch.randint(0, 512, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    tensors = {}
    back = decode(encode(opt.state_dict(), tensors), tensors)
    opt2 = build_optimizer(model, lr=1e-3)
    opt2.load_state_dict(back)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isclose(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])
