import json

import pytest
import torch

import llmlab
from llmlab.cli.main import main
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

transformers = pytest.importorskip("transformers")


def test_convert_llmlab_to_hf_and_info(tmp_path, capsys):
    torch.manual_seed(0)
    tok = train(["hello world, the model says hello"] * 4, vocab_size=300, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig.preset("nano", vocab_size=len(tok))
    model = Transformer(cfg).eval()
    llmlab.save(model, tok, tmp_path / "ckpt", format="llmlab")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok.encode("hello world")
    assert ref_tok.encode("hello world") == ids
    with torch.no_grad():
        torch.testing.assert_close(ref(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=0)
    capsys.readouterr()
    for src, fmt in ((tmp_path / "hf", "hf"), (tmp_path / "ckpt", "llmlab")):
        assert main(["model", "info", str(src), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == fmt and info["params"] == model.num_parameters()
        assert info["kv_bytes_per_token_bf16"] == cfg.kv_cache_bytes_per_token(2)
    assert main(["model", "info", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err
