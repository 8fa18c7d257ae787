"""Packed documents (document_ids): every document gets exactly the logits it gets alone, on every backend."""

import pytest
import torch

from llmlab.model import ModelConfig, Transformer

LENGTHS = [5, 7, 4]


POSITIONS = {"rope": {}, "learned": dict(position="learned"), "alibi": dict(position="alibi"),
             # documents of 5 and 7 tokens pass the original length 6, each by its own amount, the third does not
             "dynamic_ntk": dict(rope_scaling="dynamic_ntk", rope_factor=4.0, rope_original_max_seq_len=6)}


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash"])
@pytest.mark.parametrize("position", list(POSITIONS))
def test_packed_documents_match_separate_runs(backend, position):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", attn_backend=backend, **POSITIONS[position])
    model = Transformer(cfg).eval()
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in LENGTHS]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        plain = model(packed).logits[0]
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[LENGTHS[0]:], alone[LENGTHS[0]:], atol=1e-3)  # packing without ids leaks


def test_packed_loss_equals_mean_of_separate_losses():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano")
    model = Transformer(cfg).eval()
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in LENGTHS]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    labels = packed.clone()
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()])
    labels[0, starts[1:]] = -100  # no document predicts the first token of the next one
    with torch.no_grad():
        loss = model(packed, document_ids=doc_ids, labels=labels).loss
        per_doc = [model(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    torch.testing.assert_close(loss, sum(per_doc) / sum(n - 1 for n in LENGTHS))


def test_document_ids_errors():
    model = Transformer(ModelConfig.preset("nano"))
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="document_ids must have the shape"):
        model(x, document_ids=torch.zeros(1, 3, dtype=torch.long))
