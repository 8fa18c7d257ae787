"""The tokenizer pipeline, as Hugging Face `tokenizers` defines it and tokenizer.json stores it:

    added tokens split out -> normalizer -> pre-tokenizer -> model (BPE | WordPiece | Unigram) -> post-processor
    ids -> tokens -> decoder -> text

Added tokens (special or not) are matched before anything else, so "<|im_end|>" is always one id; with
parse_special=False special ones are ordinary text, which is how user input is kept from injecting them.
"""

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import regex

from . import chat as chat_templates
from .bpe import BPE
from .decode import ByteLevelDecoder, WordPieceDecoder, decoder_from_hf
from .normalize import BertNormalizer, normalizer_from_hf
from .postprocess import TemplateProcessing, post_processor_from_hf
from .pretokenize import BertPreTokenizer, ByteLevel, byte_symbols, pre_tokenizer_from_hf, raw_piece_split
from .vocab import CACHE_LIMIT
from .wordpiece import WordPiece, read_vocab_txt, write_vocab_txt

MANY_NEW_PIECES = 64  # from this many new pre-tokens in one text, merging them together in numpy is faster


def _model_class(kind: str):
    if kind == "Unigram":
        from .unigram import Unigram

        return Unigram
    return {"BPE": BPE, "WordPiece": WordPiece}.get(kind)


@dataclass
class AddedToken:
    """A token matched verbatim in the input before the pipeline runs (tokenizer.json "added_tokens").
    lstrip / rstrip swallow the whitespace beside it; single_word matches only outside words; normalized
    ones are matched in normalized text."""

    content: str
    id: int
    special: bool = True
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False

    def pattern(self) -> str:
        p = regex.escape(self.content)
        if self.single_word:
            p = rf"(?<!\w){p}(?!\w)"
        return (r"\s*" if self.lstrip else "") + p + (r"\s*" if self.rstrip else "")


def _added_regex(tokens: list[AddedToken]) -> "regex.Pattern | None":
    if not tokens:
        return None
    ordered = sorted(tokens, key=lambda t: len(t.content), reverse=True)  # longest first: "<a><b>" beats "<a>"
    return regex.compile("|".join(f"(?P<t{t.id}>{t.pattern()})" for t in ordered))


class Tokenizer:
    """normalizer, pre_tokenizer, post_processor and decoder are optional pipeline stages (None: identity /
    no splitting / no extra tokens / tokens joined by spaces); model is a BPE, WordPiece or Unigram."""

    def __init__(self, model, *, normalizer=None, pre_tokenizer=None, post_processor=None, decoder=None,
                 added_tokens: Sequence[AddedToken] = (), chat_template: str | dict[str, str] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None):
        self.model, self.normalizer, self.pre_tokenizer = model, normalizer, pre_tokenizer
        self.post_processor, self.decoder = post_processor, decoder
        self.chat_template = chat_template
        self._id_to_token = [model.id_to_token(i) for i in range(model.vocab_size)]
        self.added_tokens: list[AddedToken] = []
        for t in sorted(added_tokens, key=lambda t: t.id):
            if not isinstance(t.content, str) or not t.content:
                raise ValueError(f"added tokens must be non-empty strings, got {t.content!r}")
            if t.id < len(self._id_to_token):
                if self._id_to_token[t.id] != t.content:
                    raise ValueError(f"added token {t.content!r} has id {t.id}, which the model vocab gives to "
                                     f"{self._id_to_token[t.id]!r}")
            elif t.id == len(self._id_to_token):
                self._id_to_token.append(t.content)
            else:
                raise ValueError(f"added token {t.content!r} has id {t.id}; ids beyond the model vocab "
                                 f"({len(self._id_to_token)}) must continue it without gaps")
            self.added_tokens.append(t)
        self._added = {t.content: t for t in self.added_tokens}
        self._special_ids = {t.id for t in self.added_tokens if t.special}
        raw = [t for t in self.added_tokens if not t.normalized]
        self._raw_all = _added_regex(raw)
        self._raw_plain = _added_regex([t for t in raw if not t.special])
        normed = [t for t in self.added_tokens if t.normalized]
        if normed and normalizer is not None:  # matched in normalized text, so normalize their content too
            normed = [AddedToken(**{**asdict(t), "content": normalizer(t.content)}) for t in normed]
        self._norm_all = _added_regex(normed)
        self._norm_plain = _added_regex([t for t in normed if not t.special])
        specials = [t.content for t in self.added_tokens if t.special]
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and self.token_to_id(tok) is None:
                raise ValueError(f"{name} {tok!r} is not in the vocab; special tokens are {specials}")
        self._fast = None
        # Byte-level pipelines that only cut the raw text (GPT-2, SmolLM2, Llama 3) take a shortcut: a cache keyed
        # by the raw piece, which skips spelling cached pieces in the byte alphabet.
        self._piece_split = raw_piece_split(pre_tokenizer) if normalizer is None and not normed else None
        self._piece_cache: dict[str, list[int]] = {}

    # --- vocabulary ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self._id_to_token)}

    @property
    def merges(self) -> list[tuple[str, str]]:
        return list(self.model.merges) if isinstance(self.model, BPE) else []

    @property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self.added_tokens if t.special]

    def token_to_id(self, token: str) -> int | None:
        t = self._added.get(token)
        return t.id if t is not None else self.model.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        self._check_id(i)
        return self._id_to_token[i]

    def _check_id(self, i) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._id_to_token):
            raise ValueError(f"token id {i!r} is out of range for a vocab of size {len(self._id_to_token)}")

    # --- encoding --------------------------------------------------------------------------------------

    @staticmethod
    def _split(text: str, pattern) -> list[tuple[str, int | None]]:
        """(text, None) chunks and (match, added id) chunks, in order."""
        if pattern is None:
            return [(text, None)]
        out, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            out.append((m.group(), int(m.lastgroup[1:])))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _encode_sequence(self, text: str, parse_special: bool, tokenize=None) -> list[int]:
        shortcut = tokenize is None and self._piece_split is not None
        tokenize = tokenize or self.model.tokenize
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        pos = 0
        for chunk, added in self._split(text, self._raw_all if parse_special else self._raw_plain):
            at_start, pos = pos == 0, pos + len(chunk)
            if added is not None:
                ids.append(added)
                continue
            if self.normalizer is not None:
                chunk = self.normalizer(chunk)
            if shortcut:
                ids.extend(self._byte_level_pieces(chunk))
                continue
            for sub, added2 in self._split(chunk, self._norm_all if parse_special else self._norm_plain):
                if added2 is not None:
                    ids.append(added2)
                elif sub:
                    pieces = self.pre_tokenizer([sub], at_start) if self.pre_tokenizer is not None else [sub]
                    for piece in pieces:
                        ids.extend(tokenize(piece))
                at_start = False
        return ids

    def _byte_level_pieces(self, chunk: str) -> list[int]:
        pieces, cache = self._piece_split(chunk), self._piece_cache
        found = list(map(cache.get, pieces))
        if None in found:
            new = [p for p, got in zip(pieces, found) if got is None]
            # a text with many new pieces merges them together, as encode_batch does
            known = self._cache_new_pieces(new) if len(new) >= MANY_NEW_PIECES else cache
            # past this cache, the model's own would only hold the same pieces a second time
            merge = self._merge_raw_piece
            for k, piece in enumerate(pieces):
                if found[k] is None:
                    got = known.get(piece)
                    if got is None:
                        if len(cache) >= CACHE_LIMIT:
                            cache.clear()
                        got = cache[piece] = merge(piece)
                    found[k] = got
        return [i for got in found for i in got]

    def _merge_raw_piece(self, piece: str) -> list[int]:
        if hasattr(self.model, "tokenize_raw"):
            return self.model.tokenize_raw(piece)
        return getattr(self.model, "_tokenize", self.model.tokenize)(byte_symbols(piece))

    def encode_with_type_ids(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True,
                             parse_special: bool = True) -> tuple[list[int], list[int]]:
        """(ids, token_type_ids) for text or the pair (text, pair), e.g. BERT's "[CLS] A [SEP] B [SEP]"."""
        a = self._encode_sequence(text, parse_special)
        b = None if pair is None else self._encode_sequence(pair, parse_special)
        if self.post_processor is not None:  # without special tokens it still types the sequences, as `tokenizers` does
            return self.post_processor(a, b, add_special_tokens)
        return a + (b or []), [0] * len(a) + [1] * len(b or [])

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True,
               parse_special: bool = True) -> list[int]:
        """Text -> ids. parse_special=False treats special-token strings in text as ordinary text (use it
        for anything a user typed)."""
        return self.encode_with_type_ids(text, pair, add_special_tokens=add_special_tokens,
                                         parse_special=parse_special)[0]

    def encode_sampled(self, text: str, *, alpha: float = 0.1, nbest_size: int = -1, seed: int | None = None,
                       parse_special: bool = True) -> list[int]:
        """Subword regularization (Kudo 2018): each pre-token's segmentation is sampled from the Unigram model
        with P(x) proportional to p(x)^alpha (from all segmentations, or the nbest_size best), a different one
        per call -- a data augmentation for training. No post-processing is applied."""
        if not hasattr(self.model, "sample"):
            raise ValueError(f"sampled encoding needs a Unigram model; this tokenizer's is {type(self.model).__name__}")
        rng = random.Random(seed)
        return self._encode_sequence(text, parse_special, lambda w: self.model.sample(w, alpha, nbest_size, rng))

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True, parse_special: bool = True,
                     fast: bool = True) -> list[list[int]]:
        """Many texts at once; with fast=True the work goes to a compiled library when one is installed
        (tiktoken for plain byte-level BPE, else `tokenizers`), which gives identical ids. Otherwise our own
        encoder runs; for plain byte-level BPE it merges the batch's new pre-tokens all together (numpy)."""
        if fast:
            if self._fast is None:
                from .fast import fast_encoder  # local: the compiled libraries are optional

                self._fast = fast_encoder(self) or False
            if self._fast:
                return self._fast(list(texts), add_special_tokens=add_special_tokens, parse_special=parse_special)
        if self._piece_split is not None and hasattr(self.model, "tokenize_joined"):
            return self._encode_batch_pieces(texts, add_special_tokens, parse_special)
        return [self.encode(t, add_special_tokens=add_special_tokens, parse_special=parse_special) for t in texts]

    def _encode_batch_pieces(self, texts: Sequence[str], add_special_tokens: bool,
                             parse_special: bool) -> list[list[int]]:
        """encode_batch in Python for byte-level BPE: split every text, merge the pre-tokens not cached yet all
        at once (_cache_new_pieces), then read each text off the cache. A text with an added token in it goes
        through encode, which splits around the token first."""
        added = self._raw_all if parse_special else self._raw_plain
        pieces = [self._piece_split(t) if isinstance(t, str) and (added is None or added.search(t) is None) else None
                  for t in texts]
        known = self._cache_new_pieces(p for ps in pieces if ps is not None for p in ps)
        out = []
        for text, ps in zip(texts, pieces):
            if ps is None:
                out.append(self.encode(text, add_special_tokens=add_special_tokens, parse_special=parse_special))
                continue
            ids = [i for p in ps for i in known[p]]
            if add_special_tokens and self.post_processor is not None:
                ids = self.post_processor(ids, None)[0]
            out.append(ids)
        return out

    def _cache_new_pieces(self, pieces: Iterable[str]) -> dict[str, list[int]]:
        """Merge the pieces not in the piece cache all together (BPE.tokenize_joined, numpy) and cache them.
        Returns where every piece's ids can be read: the cache, or, when the new pieces overflowed it (it starts
        again), the old and new entries together."""
        cache = self._piece_cache
        missing = list({p: None for p in pieces if p not in cache})
        if not missing or not hasattr(self.model, "tokenize_joined"):
            return cache
        new = dict(zip(missing, self.model.tokenize_joined(byte_symbols("".join(missing)),
                                                            [len(p.encode()) for p in missing])))
        known = cache
        if len(cache) + len(new) > CACHE_LIMIT:
            known = {**cache, **new}
            cache.clear()
        if len(new) <= CACHE_LIMIT:
            cache.update(new)
        return known

    def tokenize(self, text: str, parse_special: bool = True) -> list[str]:
        """Text -> token strings, without post-processing."""
        return [self._id_to_token[i] for i in self._encode_sequence(text, parse_special)]

    # --- decoding --------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text through the decoder; skip_special_tokens drops special added tokens."""
        tokens = []
        for i in ids:
            i = int(i) if hasattr(i, "__index__") and not isinstance(i, int) else i  # numpy / torch ints
            self._check_id(i)
            if not (skip_special_tokens and i in self._special_ids):
                tokens.append(self._id_to_token[i])
        if self.decoder is None:
            return " ".join(tokens)
        return "".join(self.decoder(tokens))

    # --- chat ------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_assistant_mask: bool = False,
                            chat_template: str | None = None, tools: list | None = None, **variables):
        """Render messages with the chat template (this tokenizer's, or a built-in name such as "chatml").

        tokenize=False returns the text. Otherwise the text is encoded in segments: message contents with
        special-token parsing off (a user cannot inject "<|im_end|>"), the template's own text with it on.
        return_assistant_mask=True returns {"input_ids", "assistant_mask"}, the mask being 1 on the tokens of
        assistant turns (what multi-turn SFT trains on).
        """
        template = self._chat_template_source(chat_template, tools)
        if "{" not in template:  # a name: every Jinja template has a "{"
            template = chat_templates.get_template(template)
        variables.setdefault("bos_token", self.bos_token or "")
        variables.setdefault("eos_token", self.eos_token or "")
        text, spans = chat_templates.render_chat_with_spans(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools, **variables)
        if not tokenize:
            return text
        contents = chat_templates.content_spans(template, messages, text, add_generation_prompt=add_generation_prompt,
                                                tools=tools, **variables)
        ids, mask = self._encode_chat(text, messages, spans, contents)
        return {"input_ids": ids, "assistant_mask": mask} if return_assistant_mask else ids

    def _chat_template_source(self, chat_template: str | None, tools: list | None) -> str:
        """The template to render, chosen as transformers chooses: a tokenizer with several named templates
        takes chat_template as a name among them, else "tool_use" when tools are given and it has one, else
        "default"."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in own:
                    return own["tool_use"]
                if "default" not in own:
                    raise ValueError(f"this tokenizer has several chat templates and none named 'default': pass "
                                     f"chat_template= one of {sorted(own)}")
                return own["default"]
        template = chat_template or own
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template= (a Jinja template or a "
                             "built-in name: chatml, llama3)")
        return template

    def _encode_chat(self, text: str, messages: list[dict], spans: list[tuple[int, int]],
                     contents: list[tuple[int, int]] | None = None):
        # The messages' contents in the rendered text are user data (encoded with special-token parsing off):
        # located exactly by chat.content_spans, or else searched for in order.
        plain, pos = list(contents or []), 0
        for j, m in enumerate(messages if contents is None else ()):
            content = m.get("content")
            if not isinstance(content, str) or not content:
                continue
            at = text.find(content, pos)
            if at < 0:
                if any(s in content for s in self.special_tokens):
                    raise ValueError(f"message {j} contains special-token text and the template changes the "
                                     "content, so it cannot be encoded safely; remove the special token text")
                continue
            plain.append((at, at + len(content)))
            pos = at + len(content)
        cuts = sorted({0, len(text), *(p for s in plain for p in s), *(p for s in spans for p in s)})
        ids: list[int] = []
        mask: list[int] = []
        for a, b in zip(cuts, cuts[1:]):
            is_plain = any(s <= a and b <= e for s, e in plain)
            in_span = any(s <= a and b <= e for s, e in spans)
            seg = self._encode_sequence(text[a:b], parse_special=not is_plain)
            ids += seg
            mask += [int(in_span)] * len(seg)
        return ids, mask

    # --- Hugging Face files ----------------------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [asdict(t) for t in self.added_tokens],
            "normalizer": None if self.normalizer is None else self.normalizer.to_hf(),
            "pre_tokenizer": None if self.pre_tokenizer is None else self.pre_tokenizer.to_hf(),
            "post_processor": None if self.post_processor is None else self.post_processor.to_hf(),
            "decoder": None if self.decoder is None else self.decoder.to_hf(),
            "model": self.model.to_hf_model(),
        }

    @classmethod
    def from_hf_dict(cls, data: dict, config: dict | None = None) -> "Tokenizer":
        """From a parsed tokenizer.json (and optionally tokenizer_config.json for the chat template and
        bos/eos/pad tokens)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("not a tokenizer.json: expected an object with a 'model' object")
        kind = data["model"].get("type")
        if kind is None:  # old files omit the model type; guess it from the keys
            kind = "BPE" if "merges" in data["model"] else "WordPiece" if "continuing_subword_prefix" in data["model"] \
                else "Unigram"
        if _model_class(kind) is None:
            raise ValueError(f"unsupported model type {kind!r}; supported: BPE, WordPiece, Unigram")
        model = _model_class(kind).from_hf_model(data["model"])
        added = []
        for t in data.get("added_tokens") or []:
            if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
                raise ValueError(f"malformed added token {t!r}: needs a string 'content' and an int 'id'")
            added.append(AddedToken(t["content"], t["id"], **{k: bool(t.get(k, d)) for k, d in (
                ("special", False), ("single_word", False), ("lstrip", False), ("rstrip", False), ("normalized", False))}))
        config = config or {}

        def token(key):
            v = config.get(key)
            return v.get("content") if isinstance(v, dict) else v

        return cls(model, normalizer=normalizer_from_hf(data.get("normalizer")),
                   pre_tokenizer=pre_tokenizer_from_hf(data.get("pre_tokenizer")),
                   post_processor=post_processor_from_hf(data.get("post_processor")),
                   decoder=decoder_from_hf(data.get("decoder")), added_tokens=added,
                   chat_template=_named_templates(config.get("chat_template")), bos_token=token("bos_token"),
                   eos_token=token("eos_token"), pad_token=token("pad_token"))

    def config_dict(self) -> dict:
        """tokenizer_config.json: what transformers needs beside tokenizer.json."""
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is not None:
                cfg[name] = getattr(self, name)
        if isinstance(self.chat_template, dict):  # several named templates: the list form transformers reads
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg

    def save(self, path: str | os.PathLike) -> str:
        """Write tokenizer.json to path; a directory also gets tokenizer_config.json (chat template, bos/eos),
        so transformers' AutoTokenizer loads it. Returns the tokenizer.json written."""
        path = os.fspath(path)
        files = {path: self.to_hf_dict()}
        if os.path.isdir(path):
            files = {os.path.join(path, "tokenizer.json"): self.to_hf_dict(),
                     os.path.join(path, "tokenizer_config.json"): self.config_dict()}
        for name, data in files.items():
            tmp = name + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:  # temp file + rename: a killed save leaves no half file
                json.dump(data, f, ensure_ascii=False, indent=2)
            os.replace(tmp, name)
        return next(iter(files))

    def save_vocab_merges(self, directory: str | os.PathLike) -> tuple[str, str]:
        """GPT-2's vocab.json + merges.txt (byte-level BPE only)."""
        if not isinstance(self.model, BPE):
            raise ValueError("vocab.json + merges.txt hold a BPE model; this tokenizer's model is "
                             f"{type(self.model).__name__}")
        d = os.fspath(directory)
        vocab_path, merges_path = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_path, "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.model.merges))
        return vocab_path, merges_path

    def save_vocab_txt(self, path: str | os.PathLike) -> str:
        """BERT's vocab.txt (WordPiece only): one token per line in id order."""
        if not isinstance(self.model, WordPiece):
            raise ValueError(f"vocab.txt holds a WordPiece model; this tokenizer's model is {type(self.model).__name__}")
        return write_vocab_txt(self.model.vocab, path)


# --- standard pipelines --------------------------------------------------------------------------------


def byte_level_bpe(model: BPE, special_tokens: Sequence[str] = (), **kwargs) -> Tokenizer:
    """GPT-2 style: ByteLevel pre-tokenizer and decoder; special tokens are added tokens."""
    return Tokenizer(model, pre_tokenizer=ByteLevel(), decoder=ByteLevelDecoder(),
                     added_tokens=[AddedToken(s, model.vocab[s]) for s in special_tokens], **kwargs)


def bert_wordpiece(model: WordPiece, special_tokens: Sequence[str] = (), *, lowercase: bool = True,
                   normalizer: BertNormalizer | None = None) -> Tokenizer:
    """BERT: BertNormalizer, BertPreTokenizer, "[CLS] A [SEP] B [SEP]" when both are in the vocab."""
    post = None
    if "[CLS]" in model.vocab and "[SEP]" in model.vocab:
        post = TemplateProcessing.bert(("[CLS]", model.vocab["[CLS]"]), ("[SEP]", model.vocab["[SEP]"]))
    return Tokenizer(model, normalizer=normalizer or BertNormalizer(lowercase=lowercase),
                     pre_tokenizer=BertPreTokenizer(), post_processor=post,
                     decoder=WordPieceDecoder(model.prefix), pad_token="[PAD]" if "[PAD]" in model.vocab else None,
                     added_tokens=[AddedToken(s, model.vocab[s]) for s in special_tokens])


def from_vocab_merges(vocab_path: str, merges_path: str) -> Tokenizer:
    """GPT-2's vocab.json + merges.txt. Vocab entries that BPE cannot produce (not spelled in the byte
    alphabet, such as "<|endoftext|>") become special added tokens."""
    with open(vocab_path, encoding="utf-8") as f:
        try:
            vocab = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab_path} is not valid JSON: {e}") from None
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{n}: expected two tokens separated by one space, got {line!r}")
            merges.append((parts[0], parts[1]))
    # A multi-character token that no merge produces can only come from the text as an added token.
    merged = {a + b for a, b in merges}
    specials = [t for t in vocab if len(t) > 1 and t not in merged]
    return byte_level_bpe(BPE(vocab, merges), specials)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _named_templates(template):
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} -> a dict by name."""
    if isinstance(template, list):
        try:
            return {t["name"]: t["template"] for t in template}
        except (TypeError, KeyError):
            raise ValueError('malformed chat_template list in tokenizer_config.json: expected {"name": ..., '
                             '"template": ...} objects') from None
    return template


def _chat_template_files(directory: str) -> dict[str, str]:
    """The chat templates transformers 5 saves beside tokenizer_config.json: chat_template.jinja ("default") and
    additional_chat_templates/<name>.jinja."""
    files = {"default": os.path.join(directory, "chat_template.jinja")}
    extra = os.path.join(directory, "additional_chat_templates")
    if os.path.isdir(extra):
        files.update({name.removesuffix(".jinja"): os.path.join(extra, name) for name in sorted(os.listdir(extra))
                      if name.endswith(".jinja")})
    out = {}
    for name, file in files.items():
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                out[name] = f.read()
    return out


def load(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json, a BERT vocab.txt, a GPT-2 vocab.json (merges.txt beside it), or a directory holding
    them (tokenizer.json first; tokenizer_config.json beside it supplies the chat template and bos/eos)."""
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    templates = _chat_template_files(directory)
    if templates:  # as in transformers, template files win over the config's entry
        config = {**config, "chat_template": templates["default"] if list(templates) == ["default"] else templates}
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise ValueError(f"{path}: directory has no tokenizer.json, vocab.json + merges.txt, or vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        if path.endswith(".txt"):
            model = WordPiece(read_vocab_txt(path))
            specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in model.vocab]
            return bert_wordpiece(model, specials, lowercase=config.get("do_lower_case", True))
        if os.path.basename(path) == "vocab.json":
            merges = os.path.join(os.path.dirname(path), "merges.txt")
            if not os.path.isfile(merges):
                raise ValueError("vocab.json needs merges.txt beside it")
            tok = from_vocab_merges(path, merges)
        else:
            tok = Tokenizer.from_hf_dict(_read_json(path), config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return tok
