"""llmlab.load / save / embed: every source kind, both save formats, and MiniLM against sentence-transformers."""

import pytest
import torch

import llmlab
from llmlab.io.assets import AssetNotFoundError
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import train

SENTENCES = ["a sentence", "another, longer sentence with more words than the first one", "机器学习很有趣", "x",
             "The capital of France is Paris."]


@pytest.fixture(scope="module")
def minilm():
    try:
        return llmlab.load("minilm-l6")
    except AssetNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_embed_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from llmlab.io.assets import asset_path

    model, tok = minilm
    ours = llmlab.embed(model, tok, SENTENCES, batch_size=2)
    ref = st.SentenceTransformer(str(asset_path("minilm-l6")), device="cpu")
    expected = ref.encode(SENTENCES, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_embed_pooling_options(minilm):
    model, tok = minilm
    mean = llmlab.embed(model, tok, SENTENCES[:2], normalize=False)
    cls = llmlab.embed(model, tok, SENTENCES[:2], pooling="cls", normalize=False)
    ids = torch.tensor([tok.encode(SENTENCES[0])])
    hidden = model(ids).hidden_states[0]
    torch.testing.assert_close(mean[0], hidden.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cls[0], hidden[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        llmlab.embed(model, tok, SENTENCES, pooling="max")


@pytest.mark.parametrize("fmt", ["llmlab", "hf"])
def test_save_and_load_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    tok = train(["hello world, the model says hello"] * 4, vocab_size=300, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig.preset("nano", vocab_size=len(tok))
    model = Transformer(cfg).eval()
    llmlab.save(model, tok, tmp_path / "out", format=fmt)
    again, tok2 = llmlab.load(tmp_path / "out")
    ids = torch.tensor([tok.encode("hello world")])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    assert tok2.encode("hello world<|endoftext|>") == tok.encode("hello world<|endoftext|>")


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="named asset"):
        llmlab.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        llmlab.load(tmp_path)
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        llmlab.save(Transformer(ModelConfig.preset("nano")), None, tmp_path / "x", format="onnx")
