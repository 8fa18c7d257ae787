"""GGUF import: small synthetic files written with gguf.GGUFWriter (fast), then the real SmolLM2-135M-Instruct
GGUF checked against transformers' own GGUF loader (slow): weights, logits, tokenizer, chat template, a greedy
answer."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from llmlab.io.assets import AssetNotFoundError, asset_path
from llmlab.io.gguf import GGUFError, read_gguf, unpermute_rotary

# ------------------------------------------------------------------------------------ synthetic files

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# control tokens, then the 256 bytes, then what the merges build, then a user-defined token
TOKENS = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "<think>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS) - 1) + [4]
VOCAB = len(TOKENS)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face layout and names, one layer."""
    g = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "model.layers.0.mlp.gate_proj.weight": (INTER, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (INTER, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, INTER),
    }
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return {k: g.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
}


def write_gguf(path: Path, weights: dict, types=None, arch="llama", extra=None, token_types=TOKEN_TYPES) -> dict:
    """Write `weights` (HF names and layout) the way llama.cpp would; returns what a perfect reader must give
    back: the stored values dequantized, in HF layout."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", HIDDEN)
    w.add_uint32(f"{arch}.feed_forward_length", INTER)
    w.add_uint32(f"{arch}.attention.head_count", HEADS)
    w.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{arch}.rope.dimension_count", HEAD_DIM)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", VOCAB)
    w.add_string("general.name", "tiny test llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.token_type", token_types)
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    for key, add in (extra or {}).items():
        add(w, key)
    expected = {}
    for hf_name, value in weights.items():
        stored = value
        if hf_name.endswith("q_proj.weight"):
            stored = llama_cpp_permute(value, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            stored = llama_cpp_permute(value, KV_HEADS)
        qtype = types.get(hf_name, Q.F32)
        data = quantize(stored, qtype)
        shape = stored.shape if qtype in (Q.F32, Q.F16) else None  # quantized: derived from the byte shape
        w.add_tensor(GGUF_NAMES[hf_name], data, raw_shape=shape, raw_dtype=qtype)
        expected[hf_name] = dequantize(data, qtype).reshape(value.shape)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # the reader must undo the permutation
            heads = HEADS if "q_proj" in hf_name else KV_HEADS
            expected[hf_name] = expected[hf_name].reshape(heads, HEAD_DIM // 2, 2, HIDDEN).swapaxes(1, 2)
            expected[hf_name] = expected[hf_name].reshape(value.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_roundtrip_f32_is_exact_and_undoes_the_rotary_permutation(tmp_path):
    weights = hf_weights(tied=False)
    write_gguf(tmp_path / "m.gguf", weights)
    m = read_gguf(tmp_path / "m.gguf")
    assert set(m.state_dict) == set(weights)
    for name, value in weights.items():  # F32 is stored exactly, so Q and K must come back bit for bit
        assert torch.equal(m.state_dict[name], torch.from_numpy(value)), name
    assert m.hf_config["tie_word_embeddings"] is False
    assert m.hf_config["num_key_value_heads"] == KV_HEADS and m.hf_config["head_dim"] == HEAD_DIM


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16])
def test_quantized_tensors_dequantize(tmp_path, qtype):
    weights = hf_weights(seed=1)
    matrices = [k for k, v in weights.items() if v.ndim == 2]  # norms stay F32, as llama.cpp keeps them
    expected = write_gguf(tmp_path / "m.gguf", weights, types={k: qtype for k in matrices})
    m = read_gguf(tmp_path / "m.gguf")
    assert "lm_head.weight" not in m.state_dict and m.hf_config["tie_word_embeddings"] is True
    for name in weights:
        assert torch.equal(m.state_dict[name], torch.from_numpy(expected[name])), name
        tolerance = {Q.Q4_0: 0.1, Q.Q4_1: 0.1}.get(qtype, 0.01)  # the stored values are close to the originals
        assert np.abs(expected[name] - weights[name]).max() < tolerance
    assert m.metadata["tensor_types"] == {qtype.name: len(matrices), "F32": len(weights) - len(matrices)}


def _same_as_gguf_reader(path: Path) -> None:
    """Our header reader (io/gguf_file.py) against gguf's GGUFReader: every metadata value, every tensor's
    name, shape, type and bytes."""
    from llmlab.io.gguf_file import GGUFFile

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.shape, a.tensor_type) == (b.name, tuple(int(d) for d in b.shape), b.tensor_type)
        assert a.data.tobytes() == np.asarray(b.data).tobytes(), a.name


def test_header_reader_equals_gguf_reader(tmp_path):
    extra = {"test.u8": lambda w, k: w.add_uint8(k, 7), "test.i16": lambda w, k: w.add_int16(k, -3),
             "test.u64": lambda w, k: w.add_uint64(k, 2**40), "test.i64": lambda w, k: w.add_int64(k, -2**40),
             "test.f64": lambda w, k: w.add_float64(k, 0.1), "test.bool": lambda w, k: w.add_bool(k, True),
             "test.floats": lambda w, k: w.add_array(k, [0.5, -1.25]), "test.bools": lambda w, k: w.add_array(
                 k, [True, False]), "test.unicode": lambda w, k: w.add_string(k, "žluťoučký 中文")}
    weights = hf_weights(seed=2)
    write_gguf(tmp_path / "m.gguf", weights, types={"model.layers.0.mlp.up_proj.weight": Q.Q4_1,
                                                    "model.layers.0.mlp.down_proj.weight": Q.Q8_0}, extra=extra)
    _same_as_gguf_reader(tmp_path / "m.gguf")


def test_dtype_argument(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(), types={"model.embed_tokens.weight": Q.Q8_0})
    m = read_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in m.state_dict.values())
    assert m.hf_config["torch_dtype"] == "bfloat16"


def test_unpermute_known_tensor():
    # one head of 4 rows: HF order [r0 r1 | r2 r3] (halves rotate together); llama.cpp stores [r0 r2 r1 r3]
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rotary(stored, 1).ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
    two_heads = np.array([0, 2, 1, 3, 4, 6, 5, 7], dtype=np.float32)  # biases (1-D) are permuted too
    assert unpermute_rotary(two_heads, 2).tolist() == list(range(8))
    # K uses the key/value head count: with the wrong count the rows land elsewhere
    k = np.arange(KV_HEADS * HEAD_DIM, dtype=np.float32)
    assert np.array_equal(unpermute_rotary(llama_cpp_permute(k, KV_HEADS), KV_HEADS), k)
    assert not np.array_equal(unpermute_rotary(llama_cpp_permute(k, KV_HEADS), HEADS), k)


def test_config_and_metadata(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights())
    m = read_gguf(tmp_path / "m.gguf")
    c = m.hf_config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, INTER, 1)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0 and "rope_scaling" not in c
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert m.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert m.metadata["general.name"] == "tiny test llama" and m.metadata["general.architecture"] == "llama"
    assert m.chat_template.startswith("{% for m in messages %}")


def test_rope_scaling_and_end_of_turn_tokens(tmp_path):
    extra = {
        "llama.rope.scaling.type": lambda w, k: w.add_string(k, "linear"),
        "llama.rope.scaling.factor": lambda w, k: w.add_float32(k, 4.0),
        "tokenizer.ggml.eot_token_id": lambda w, k: w.add_uint32(k, 0),
    }
    write_gguf(tmp_path / "m.gguf", hf_weights(), extra=extra)
    m = read_gguf(tmp_path / "m.gguf")
    assert m.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert m.generation_config["eos_token_id"] == [2, 0]  # generation also stops on end-of-turn


def test_tokenizer_json_from_metadata(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    write_gguf(tmp_path / "m.gguf", hf_weights())
    m = read_gguf(tmp_path / "m.gguf")
    tok = tokenizers.Tokenizer.from_str(json.dumps(m.tokenizer_json))
    ids = tok.encode("the<|im_start|> the<think>42").ids
    vocab = {t: i for i, t in enumerate(TOKENS)}
    assert ids == [vocab["t"], vocab["he"], 1, vocab["Ġthe"], vocab["<think>"], vocab["4"], vocab["2"]]
    assert tok.decode(ids, skip_special_tokens=False) == "the<|im_start|> the<think>42"
    assert tok.decode(ids, skip_special_tokens=True) == "the the<think>42"  # <think> is added, not special
    assert m.tokenizer_config["bos_token"] == "<|im_start|>" and m.tokenizer_config["add_bos_token"] is False


def test_add_bos_token_adds_bos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    extra = {"tokenizer.ggml.add_bos_token": lambda w, k: w.add_bool(k, True)}
    write_gguf(tmp_path / "m.gguf", hf_weights(), extra=extra)
    m = read_gguf(tmp_path / "m.gguf")
    tok = tokenizers.Tokenizer.from_str(json.dumps(m.tokenizer_json))
    assert tok.encode("he").ids == [1, TOKENS.index("he")]
    assert tok.encode("he", add_special_tokens=False).ids == [TOKENS.index("he")]


def test_tokenizer_matches_transformers_on_a_synthetic_file(tmp_path):
    """BOS added by the template, a declared unk that the file calls a normal token, user-defined tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    extra = {
        "tokenizer.ggml.add_bos_token": lambda w, k: w.add_bool(k, True),
        "tokenizer.ggml.unknown_token_id": lambda w, k: w.add_uint32(k, 0),
    }
    write_gguf(tmp_path / "m.gguf", hf_weights(), extra=extra, token_types=[1, *TOKEN_TYPES[1:]])
    ours = Tokenizer.from_str(json.dumps(read_gguf(tmp_path / "m.gguf").tokenizer_json))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ["the <|endoftext|> the<think>x<|im_end|>", "he", "", "thethe the  the 42"]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert ours.encode("a", "b").ids == theirs("a", "b")["input_ids"] == [1, 100, 1, 101]


# ----------------------------------------------------------------------------------------- errors


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(), arch="qwen2")
    with pytest.raises(GGUFError, match=r"architecture 'qwen2' is not supported.*llama"):
        read_gguf(tmp_path / "m.gguf")


def test_unsupported_quant_type_names_the_tensor(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(), types={"model.layers.0.mlp.up_proj.weight": Q.Q5_0})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*Q5_0.*supported types: F32, F16, BF16, Q4_0"):
        read_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_truncated_file_names_the_file(tmp_path, keep):
    path = tmp_path / "cut.gguf"
    write_gguf(path, hf_weights())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated or corrupt"):
        read_gguf(path)


def test_not_a_gguf_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip file, not a gguf" * 10)
    with pytest.raises(GGUFError, match="x.gguf is not a readable GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        read_gguf(tmp_path / "nothing.gguf")


def test_tensors_that_disagree_with_the_metadata(tmp_path):
    weights = hf_weights()
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:32]
    write_gguf(tmp_path / "a.gguf", weights)
    with pytest.raises(GGUFError, match=r"a\.gguf: tensor model.layers.0.mlp.up_proj.weight has shape \(32, 64\)"):
        read_gguf(tmp_path / "a.gguf")
    weights = hf_weights()
    del weights["model.norm.weight"]
    write_gguf(tmp_path / "b.gguf", weights)
    with pytest.raises(GGUFError, match=r"b\.gguf: 1 tensors are missing, for example 'model.norm.weight'"):
        read_gguf(tmp_path / "b.gguf")


def test_rope_freqs_refused(tmp_path):
    extra = {"rope_freqs.weight": lambda w, k: w.add_tensor(k, np.ones(HEAD_DIM // 2, dtype=np.float32))}
    write_gguf(tmp_path / "m.gguf", hf_weights(), extra=extra)
    with pytest.raises(GGUFError, match="rope_freqs"):
        read_gguf(tmp_path / "m.gguf")


# --------------------------------------------------------------------------- the real SmolLM2 GGUF


def _smollm2_path() -> Path:
    try:
        return asset_path("smollm2-135m-instruct")
    except AssetNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(_smollm2_path())


@pytest.fixture(scope="module")
def reference(hf_smollm2):
    """transformers' own reading of the same file (tests/conftest.py): tokenizer and model."""
    return hf_smollm2


@pytest.fixture(scope="module")
def ours(smollm2):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smollm2.hf_config))
    missing, unexpected = model.load_state_dict(smollm2.state_dict, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: the head is the embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


@pytest.mark.slow
def test_smollm2_header_reader_equals_gguf_reader():
    _same_as_gguf_reader(_smollm2_path())


@pytest.mark.slow
def test_smollm2_state_dict_equals_transformers(smollm2, reference):
    theirs = reference[1].state_dict()
    assert set(smollm2.state_dict) == set(theirs) - {"lm_head.weight"}
    for name, tensor in smollm2.state_dict.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, theirs[name]), name
    assert smollm2.metadata["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert smollm2.metadata["file_type"] == "MOSTLY_Q4_1"


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2, reference):
    c, theirs = smollm2.hf_config, reference[1].config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert c[key] == getattr(theirs, key), key
    assert np.float32(c["rms_norm_eps"]) == np.float32(theirs.rms_norm_eps)
    assert c["rope_theta"] == 100000.0 and (c["num_attention_heads"], c["num_key_value_heads"]) == (9, 3)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2, ours, reference):
    tokenizer, theirs = reference
    for prompt in ["The quick brown fox jumps over the lazy dog.", "北京是中国的首都，也是一座历史悠久的城市。"]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            a, b = ours(ids).logits, theirs(ids).logits
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (prompt, (a - b).abs().max().item())


TEXTS = [
    "Hello world! It's 2024, and 12345 + 678 = 13023.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "def f(x):\n    return x**2  # square\n\n\tprint(f(3))\r\n",
    "Emoji: 🤖👍🏽🇫🇷 ❤️ done",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b <|endoftext|>c<repo_name>d",
    "  leading, trailing and   inner spaces  ",
    "café naïve résumé Ωμέγα Привет мир",
    "",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, reference):
    from tokenizers import Tokenizer

    tokenizer = reference[0]
    ours = Tokenizer.from_str(json.dumps(smollm2.tokenizer_json))
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == tokenizer(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert smollm2.chat_template == tokenizer.chat_template
    assert ours.get_vocab_size(with_added_tokens=True) == len(tokenizer) == 49152


@pytest.mark.slow
def test_smollm2_numerals_follow_llama_cpp(smollm2, reference):
    """The file's pre-tokenizer is "smollm": llama.cpp (and SmolLM2's own tokenizer.json) cut every numeral
    alone before GPT-2's split. transformers does not know "smollm" and uses GPT-2's split only. ASCII digits
    tokenize the same either way (the vocabulary has no merges with digits); other numerals (½, ²) differ,
    and there we follow llama.cpp: transformers' tokenizer with Digits in front agrees with ours exactly."""
    from tokenizers import Tokenizer, pre_tokenizers

    ours = Tokenizer.from_str(json.dumps(smollm2.tokenizer_json))
    theirs = Tokenizer.from_str(reference[0].backend_tokenizer.to_str())
    theirs.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in ["x² ½ cup, ３ apples, ٣ and 1st", *TEXTS]:
        assert ours.encode(text).ids == theirs.encode(text).ids, text


@pytest.mark.slow
def test_smollm2_tokenizer_files_load_in_transformers(smollm2, reference, tmp_path):
    """tokenizer.json + tokenizer_config.json written from our objects make an AutoTokenizer that matches."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text(json.dumps(smollm2.tokenizer_json), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(smollm2.tokenizer_config), encoding="utf-8")
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    expected = reference[0].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    for text in TEXTS:
        assert loaded(text)["input_ids"] == reference[0](text)["input_ids"], text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2, ours):
    import jinja2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(smollm2.tokenizer_json))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    template = jinja2.Environment().from_string(smollm2.chat_template)
    prompt = template.render(messages=messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        pad = smollm2.generation_config["pad_token_id"]
        out = ours.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    answer = tokenizer.decode(out[0, ids.shape[1] :].tolist())
    assert "Paris" in answer, answer
