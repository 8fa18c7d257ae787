"""Issue 8's comparison, small enough for CI: SmolLM2-135M-Instruct loaded once, then every PEFT method applied
to a fresh copy (train.supervised.PeftSetup, as `llmlab sft --peft` does) and trained a few AdamW steps on the
English chat corpus: each lowers the held-out loss and trains only its own, few parameters. The full-size
table (peak memory, tokens/s, final validation loss per method, against full fine-tuning) comes from
benchmarks/peft_sft.py and is in docs/results/peft.md."""

import copy
import random

import pytest
import torch

from llmlab.train.supervised import PeftSetup, SFTPeft

METHODS = {  # method -> (lr, SFTPeft overrides): the benchmark's settings
    "lora": (1e-3, {}), "dora": (1e-3, {}), "adalora": (5e-3, dict(init_r=12, tinit=1, tfinal=1)),
    "ia3": (1e-2, {}), "bitfit": (1e-3, dict(target_modules=["q", "o", "up", "down"])),
    "adapter": (1e-3, {}), "prompt": (1e-2, dict(n_virtual_tokens=8, init_text="You are a helpful assistant.")), "ptuning": (1e-2, dict(n_virtual_tokens=8)),
    "prefix": (1e-2, dict(n_virtual_tokens=8)),
}
STEPS = 4


@pytest.fixture(scope="module")
def setup():
    from llmlab.api import load
    from llmlab.data import SFTLoader, encode_conversations, load_conversations, sources
    from llmlab.io.assets import AssetNotFoundError

    try:
        model, tok = load("smollm2-135m-instruct")
        convs = load_conversations("chat-english")
    except (AssetNotFoundError, sources.MissingDataError) as e:
        pytest.skip(str(e))
    convs = random.Random(0).sample(convs, 24)
    encode = dict(max_len=64, progress=False)
    pad = tok.token_to_id(tok.eos_token)
    train = next(iter(SFTLoader(encode_conversations(convs[:4], tok, **encode), batch_size=4, pad_id=pad)))
    val = next(iter(SFTLoader(encode_conversations(convs[8:16], tok, **encode), batch_size=8, pad_id=pad, drop_last=False,
                              shuffle=False)))
    return model.float(), tok, train, val


def loss(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_logits=False).loss


@pytest.mark.slow
def test_every_method_lowers_smollm2_validation_loss(setup):
    base, tok, train, val = setup
    torch.set_num_threads(2)
    for method, (lr, extra) in METHODS.items():
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # each method's fresh modules (P-tuning's encoder, adapters) start the same everywhere
        peft = PeftSetup(model, SFTPeft(method=method, **extra), tok, max_steps=STEPS + 2, seed=0)
        m = peft.train_model
        assert 0 < peft.trainable < 0.05 * peft.total_base, method
        with torch.no_grad():
            m.eval()
            before = float(loss(m, val))
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        if peft.controller is not None:  # AdaLoRA's rank allocation after each step, as in llmlab sft
            opt.register_step_post_hook(lambda o, a, k, c=peft.controller, s=[0]: (
                s.__setitem__(0, s[0] + 1), c.update_and_allocate(s[0])))
        for _ in range(STEPS):
            loss(m, train).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            m.eval()
            after = float(loss(m, val))
        assert after < before, (method, before, after)
        frozen = dict(base.named_parameters())
        for name, p in model.named_parameters():  # the base weights never moved
            if name in frozen and not p.requires_grad:
                assert torch.equal(p, frozen[name]), (method, name)
