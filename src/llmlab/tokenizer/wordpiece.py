"""WordPiece (BERT): training, encoding, decoding and Hugging Face tokenizer.json / vocab.txt I/O.

WordPiece (Schuster & Nakajima 2012; Wu et al. 2016; used by BERT, Devlin et al. 2019) starts from single
characters -- "c" at the start of a word, "##c" inside it -- and repeatedly merges the adjacent pair (a, b)
with the highest likelihood score freq(ab) / (freq(a) * freq(b)), which favours pairs whose parts rarely occur
apart. Encoding does not replay merges: each word is split greedily, longest vocab match first, with "##"
marking pieces that continue a word; a word with no full split (or over max_input_chars_per_word chars)
becomes a single [UNK].

Id layout of a trained tokenizer: special tokens first (0..k-1), then the initial alphabet in sorted order,
then merged tokens in the order they were learned.
"""

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from .bpe import _split_specials, merge_pair, special_pattern
from .normalize import BertNormalizer, bert_pretokenize

DEFAULT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CACHE_LIMIT = 100_000


def _template(cls_token: str, sep_token: str) -> tuple[list, list]:
    """BERT's templates: single "[CLS] A [SEP]", pair "[CLS] A [SEP] B [SEP]" with B's part in type 1."""
    single = [("special", cls_token, 0), ("seq", "A", 0), ("special", sep_token, 0)]
    pair = single + [("seq", "B", 1), ("special", sep_token, 1)]
    return single, pair


class WordPiece:
    """A WordPiece tokenizer: model vocab (token -> id), BERT normalizer and pre-tokenizer, BERT templates.

    special_tokens are matched in the raw text before normalization (as `tokenizers` does for added tokens
    with normalized=false), are dropped by decode(skip_special_tokens=True), and may have ids outside the
    model vocab via extra_ids.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        *,
        unk_token: str = "[UNK]",
        continuing_subword_prefix: str = "##",
        max_input_chars_per_word: int = 100,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        normalizer: BertNormalizer | None = None,
        cls_token: str | None = "[CLS]",
        sep_token: str | None = "[SEP]",
        templates: tuple[list, list] | None = None,
        decoder_cleanup: bool = True,
        extra_ids: dict[str, int] | None = None,
        non_special_added: Sequence[str] = (),
    ):
        self.vocab = dict(vocab)
        n = len(self.vocab)
        if n == 0:
            raise ValueError("vocab is empty")
        if sorted(self.vocab.values()) != list(range(n)):
            raise ValueError("vocab ids must be exactly 0..len(vocab)-1, each used once")
        if not continuing_subword_prefix or not isinstance(continuing_subword_prefix, str):
            raise ValueError("continuing_subword_prefix must be a non-empty string")
        if isinstance(max_input_chars_per_word, bool) or not isinstance(max_input_chars_per_word, int) \
                or max_input_chars_per_word < 1:
            raise ValueError(f"max_input_chars_per_word must be a positive int, got {max_input_chars_per_word!r}")
        if unk_token not in self.vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocab")
        self.unk_token = unk_token
        self.unk_id = self.vocab[unk_token]
        self.prefix = continuing_subword_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.normalizer = normalizer if normalizer is not None else BertNormalizer()
        self.decoder_cleanup = decoder_cleanup

        # Added tokens: special ones (skipped on decode) and plain added ones; both split out of raw text.
        self._id_to_token = [""] * n
        for tok, i in self.vocab.items():
            self._id_to_token[i] = tok
        self.added: dict[str, int] = {}
        extra_ids = dict(extra_ids or {})
        for tok in [*special_tokens, *non_special_added]:
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"special/added tokens must be non-empty strings, got {tok!r}")
            if tok in self.vocab:
                i = self.vocab[tok]
                if tok in extra_ids and extra_ids[tok] != i:
                    raise ValueError(f"added token {tok!r} has id {extra_ids[tok]} but the vocab says {i}")
            elif tok in extra_ids:
                i = extra_ids[tok]
            else:
                raise ValueError(f"special token {tok!r} is not in the vocab")
            self.added[tok] = i
        extra = {t: i for t, i in self.added.items() if t not in self.vocab}
        for tok, i in sorted(extra.items(), key=lambda kv: kv[1]):
            if i != len(self._id_to_token):
                raise ValueError(f"added token {tok!r} has id {i}; ids outside the vocab must continue it densely")
            self._id_to_token.append(tok)
        self.special_tokens = list(dict.fromkeys(special_tokens))
        self._special_ids = {self.added[t] for t in self.special_tokens}
        self._added_re = special_pattern(list(self.added))

        if templates is None:
            if cls_token is not None and sep_token is not None:
                for t in (cls_token, sep_token):
                    if t not in self.vocab and t not in self.added:
                        raise ValueError(f"post-processing token {t!r} is not in the vocab")
                templates = _template(cls_token, sep_token)
            else:
                templates = ([("seq", "A", 0)], [("seq", "A", 0), ("seq", "B", 1)])
        self.templates = templates
        self._cache: dict[str, list[int]] = {}

    # --- basics ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        i = self.added.get(token)
        return i if i is not None else self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        self._check_id(i)
        return self._id_to_token[i]

    def _check_id(self, i) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._id_to_token):
            raise ValueError(f"token id {i!r} is out of range for a vocab of size {len(self._id_to_token)}")

    def _special_ids_for(self, token: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise ValueError(f"template token {token!r} is not in the vocab")
        return i

    # --- encoding -------------------------------------------------------------------------------------

    def _word(self, word: str) -> list[int]:
        """Greedy longest-match-first split of one pre-token, exactly as `tokenizers`' WordPiece model."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if len(word) > self.max_input_chars_per_word:
            ids = [self.unk_id]
        else:
            ids, start, n, vocab = [], 0, len(word), self.vocab
            while start < n:
                end, found = n, None
                while start < end:
                    sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                    found = vocab.get(sub)
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_id]  # one unmatched position makes the whole word unknown
                    break
                ids.append(found)
                start = end
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _encode_sequence(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        chunks = self._added_re.split(text) if self._added_re else [text]
        ids: list[int] = []
        for j, chunk in enumerate(chunks):
            if j % 2:  # split() with one capture group alternates text, added token, text, ...
                ids.append(self.added[chunk])
            else:
                for word in bert_pretokenize(self.normalizer.normalize(chunk)):
                    ids.extend(self._word(word))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings, without [CLS] / [SEP]."""
        return [self._id_to_token[i] for i in self._encode_sequence(text)]

    def encode_with_type_ids(
        self, text: str, pair: str | None = None, add_special_tokens: bool = True
    ) -> tuple[list[int], list[int]]:
        """(ids, token_type_ids) for text, or for the pair (text, pair): "[CLS] A [SEP] B [SEP]"."""
        seqs = {"A": self._encode_sequence(text)}
        if pair is not None:
            seqs["B"] = self._encode_sequence(pair)
        if not add_special_tokens:
            ids = seqs["A"] + seqs.get("B", [])
            return ids, [0] * len(seqs["A"]) + [1] * len(seqs.get("B", []))
        ids, types = [], []
        for kind, name, type_id in self.templates[0 if pair is None else 1]:
            piece = seqs[name] if kind == "seq" else [self._special_ids_for(name)]
            ids += piece
            types += [type_id] * len(piece)
        return ids, types

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        return self.encode_with_type_ids(text, pair, add_special_tokens)[0]

    # --- decoding -------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text like `tokenizers`' WordPiece decoder: "##" pieces glue to the previous token, others
        get a space; with cleanup, spaces before . ? ! , and a few English contractions are removed."""
        out = []
        for i in ids:
            i = int(i) if hasattr(i, "__index__") and not isinstance(i, int) else i  # numpy / torch ints
            self._check_id(i)
            if skip_special_tokens and i in self._special_ids:
                continue
            tok = self._id_to_token[i]
            if out:
                tok = tok[len(self.prefix):] if tok.startswith(self.prefix) else " " + tok
            if self.decoder_cleanup:
                tok = _cleanup(tok)
            out.append(tok)
        return "".join(out)

    # --- Hugging Face tokenizer.json ------------------------------------------------------------------

    def _post_processor_dict(self) -> dict | None:
        single, pair = self.templates
        if all(kind == "seq" for kind, _, _ in single + pair):
            return None

        def items(template):
            return [
                {"SpecialToken" if kind == "special" else "Sequence": {"id": name, "type_id": t}}
                for kind, name, t in template
            ]

        specials = {}
        for kind, name, _ in single + pair:
            if kind == "special":
                specials[name] = {"id": name, "ids": [self._special_ids_for(name)], "tokens": [name]}
        return {"type": "TemplateProcessing", "single": items(single), "pair": items(pair), "special_tokens": specials}

    def to_hf_dict(self) -> dict:
        """The tokenizer.json layout `tokenizers` 0.23 uses for BERT (e.g. all-MiniLM-L6-v2)."""
        added = [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": t in self.special_tokens}
            for t, i in self.added.items()
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": sorted(added, key=lambda t: t["id"]),
            "normalizer": self.normalizer.to_hf_dict(),
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": self._post_processor_dict(),
            "decoder": {"type": "WordPiece", "prefix": self.prefix, "cleanup": self.decoder_cleanup},
            "model": {
                "type": "WordPiece",
                "unk_token": self.unk_token,
                "continuing_subword_prefix": self.prefix,
                "max_input_chars_per_word": self.max_input_chars_per_word,
                "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
            },
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write tokenizer.json to path (or into path if it is a directory); returns the file written."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)
        return path

    def save_vocab_txt(self, path: str | os.PathLike) -> str:
        """Write a plain BERT vocab.txt (model vocab only, one token per line in id order)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in self._id_to_token[: len(self.vocab)])
        return path

    @classmethod
    def from_hf_dict(cls, data: dict) -> "WordPiece":
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("not a tokenizer.json: expected an object with a 'model' object")
        model = data["model"]
        if model.get("type") != "WordPiece":
            raise ValueError(f"unsupported model type {model.get('type')!r}: expected 'WordPiece'")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in vocab.values()):
            raise ValueError("malformed tokenizer.json: model.vocab must be an object of token -> int id")
        pre = data.get("pre_tokenizer")
        if not isinstance(pre, dict) or pre.get("type") != "BertPreTokenizer":
            raise ValueError(f"unsupported pre_tokenizer {pre!r}: only BertPreTokenizer is supported")
        norm = data.get("normalizer")
        if norm is None:
            raise ValueError("unsupported normalizer null: only BertNormalizer is supported")
        normalizer = BertNormalizer.from_hf_dict(norm)
        dec = data.get("decoder")
        cleanup = True
        if dec is not None:
            if not isinstance(dec, dict) or dec.get("type") != "WordPiece":
                raise ValueError(f"unsupported decoder {dec!r}: only WordPiece is supported")
            if dec.get("prefix", "##") != model.get("continuing_subword_prefix", "##"):
                raise ValueError("decoder prefix differs from model.continuing_subword_prefix")
            cleanup = bool(dec.get("cleanup", True))

        specials, plain, extra_ids = [], [], {}
        for t in data.get("added_tokens") or []:
            if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
                raise ValueError(f"malformed added token {t!r}")
            for key in ("single_word", "lstrip", "rstrip", "normalized"):
                if t.get(key):
                    raise ValueError(f"unsupported added token option {key}=true for {t['content']!r}")
            extra_ids[t["content"]] = t["id"]
            (specials if t.get("special", False) else plain).append(t["content"])

        templates = _templates_from_hf(data.get("post_processor"))
        return cls(
            vocab,
            unk_token=model.get("unk_token", "[UNK]"),
            continuing_subword_prefix=model.get("continuing_subword_prefix", "##"),
            max_input_chars_per_word=model.get("max_input_chars_per_word", 100),
            special_tokens=specials,
            non_special_added=plain,
            extra_ids=extra_ids,
            normalizer=normalizer,
            templates=templates,
            decoder_cleanup=cleanup,
        )

    @classmethod
    def from_vocab_txt(cls, path: str | os.PathLike, *, lowercase: bool = True, **kwargs) -> "WordPiece":
        """Read a plain BERT vocab.txt (token on line i has id i). The BERT special tokens present in it
        become special tokens; lowercase picks between uncased and cased BERT normalization."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\r\n") for line in f]
        if tokens and tokens[-1] == "":
            tokens.pop()
        if not tokens:
            raise ValueError(f"{path}: vocab.txt is empty")
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                raise ValueError(f"{path}: token {t!r} appears twice (lines {vocab[t] + 1} and {i + 1})")
            vocab[t] = i
        kwargs.setdefault("special_tokens", [t for t in DEFAULT_SPECIAL_TOKENS if t in vocab])
        kwargs.setdefault("normalizer", BertNormalizer(lowercase=lowercase))
        if "[CLS]" not in vocab or "[SEP]" not in vocab:
            kwargs.setdefault("cls_token", None)
            kwargs.setdefault("sep_token", None)
        return cls(vocab, **kwargs)


def _templates_from_hf(post) -> tuple[list, list] | None:
    if post is None:
        return ([("seq", "A", 0)], [("seq", "A", 0), ("seq", "B", 1)])
    if not isinstance(post, dict):
        raise ValueError(f"malformed post_processor {post!r}")
    kind = post.get("type")
    if kind == "BertProcessing":
        try:
            (cls_tok, _), (sep_tok, _) = post["cls"], post["sep"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"malformed BertProcessing post_processor {post!r}") from None
        return _template(cls_tok, sep_tok)
    if kind != "TemplateProcessing":
        raise ValueError(f"unsupported post_processor {kind!r}: only TemplateProcessing / BertProcessing")
    special_map = post.get("special_tokens") or {}
    templates = []
    for key in ("single", "pair"):
        items = post.get(key)
        if not isinstance(items, list):
            raise ValueError(f"malformed TemplateProcessing: {key!r} must be a list")
        template = []
        for item in items:
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"malformed template item {item!r}")
            (tag, body), = item.items()
            if not isinstance(body, dict) or "id" not in body:
                raise ValueError(f"malformed template item {item!r}")
            type_id = body.get("type_id", 0)
            if tag == "Sequence":
                if body["id"] not in ("A", "B"):
                    raise ValueError(f"template sequence id must be 'A' or 'B', got {body['id']!r}")
                template.append(("seq", body["id"], type_id))
            elif tag == "SpecialToken":
                spec = special_map.get(body["id"])
                if spec is not None and spec.get("tokens") != [body["id"]]:
                    raise ValueError(f"unsupported multi-token template special {body['id']!r}")
                template.append(("special", body["id"], type_id))
            else:
                raise ValueError(f"unsupported template item {tag!r}")
        templates.append(template)
    return templates[0], templates[1]


_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _cleanup(s: str) -> str:
    # `tokenizers` applies this to each decoded token separately (after its leading space is added).
    for a, b in _CLEANUPS:
        s = s.replace(a, b)
    return s


def load_wordpiece(path: str | os.PathLike) -> WordPiece:
    """Read a WordPiece tokenizer.json, a BERT vocab.txt, or a directory holding one (tokenizer.json first)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise ValueError(f"{path}: directory has neither tokenizer.json nor vocab.txt")
    if path.endswith(".txt"):
        return WordPiece.from_vocab_txt(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return WordPiece.from_hf_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def is_wordpiece_file(path: str | os.PathLike) -> bool:
    """Whether load_wordpiece is the right reader for path: a .txt vocab, a directory with vocab.txt but no
    tokenizer.json, or a tokenizer.json whose model type is "WordPiece". Unreadable or malformed files give
    False, so a dispatcher can fall through to another loader, whose error message then applies."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            return os.path.isfile(os.path.join(path, "vocab.txt"))
        path = os.path.join(path, "tokenizer.json")
    if path.endswith(".txt"):
        return True
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("type") == "WordPiece"


# --- training ---------------------------------------------------------------------------------------------


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    *,
    unk_token: str = "[UNK]",
    continuing_subword_prefix: str = "##",
    max_input_chars_per_word: int = 100,
    normalizer: BertNormalizer | None = None,
) -> WordPiece:
    """Learn a WordPiece vocab of at most vocab_size tokens (specials + alphabet + merges).

    Each step merges the pair with the highest score count(ab) / (freq(a) * freq(b)), counts weighted by
    word frequency. Ties: the higher pair count wins, then the smaller (left, right) token strings. Pairs
    seen fewer than min_frequency times never merge; training stops when no pair qualifies. Scores are
    Python floats from int / int true division, which is correctly rounded, so equal ratios compare equal.

    Incremental updates: pair counts change only in the words holding the merged pair, and those are the
    only words rewritten. A merge also changes freq(a), freq(b) and freq(ab), which changes the score of every
    pair containing one of them anywhere in the corpus; exactly those pairs (found via a symbol -> pairs
    index), plus pairs whose counts changed, get a fresh heap entry. Older heap entries are recognised as
    stale on pop by recomputing the score (lazy deletion).
    """
    special_tokens = list(special_tokens)
    if len(set(special_tokens)) != len(special_tokens) or any(not isinstance(s, str) or not s
                                                              for s in special_tokens):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
    if unk_token not in special_tokens:
        raise ValueError(f"unk_token {unk_token!r} must be one of special_tokens {special_tokens!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if not continuing_subword_prefix:
        raise ValueError("continuing_subword_prefix must be a non-empty string")
    normalizer = normalizer if normalizer is not None else BertNormalizer()
    prefix = continuing_subword_prefix
    if isinstance(texts, str):
        texts = [texts]
    word_counts = Counter(
        w for t in _split_specials(texts, special_tokens) for w in bert_pretokenize(normalizer.normalize(t))
    )
    if not word_counts:
        raise ValueError("cannot train a tokenizer on an empty corpus")

    alphabet = sorted({w[0] for w in word_counts} | {prefix + c for w in word_counts for c in w[1:]})
    k = len(special_tokens)
    needed = k + len([a for a in alphabet if a not in special_tokens])
    if vocab_size < needed:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the corpus needs {k} special tokens + "
            f"{needed - k} initial characters = {needed}"
        )

    tokens: list[str] = list(special_tokens)
    token_ids = {t: i for i, t in enumerate(tokens)}
    for a in alphabet:
        if a not in token_ids:
            token_ids[a] = len(tokens)
            tokens.append(a)
    words = [[token_ids[w[0]]] + [token_ids[prefix + c] for c in w[1:]] for w in word_counts]
    freqs = list(word_counts.values())

    sym_freq: dict[int, int] = defaultdict(int)
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words containing it
    pairs_of: dict[int, set[tuple[int, int]]] = defaultdict(set)  # symbol -> live pairs containing it
    for i, w in enumerate(words):
        for s in w:
            sym_freq[s] += freqs[i]
        for p in zip(w, w[1:]):
            pair_counts[p] += freqs[i]
            where[p].add(i)
    for p in pair_counts:
        pairs_of[p[0]].add(p)
        pairs_of[p[1]].add(p)

    def score(p: tuple[int, int]) -> float:
        return pair_counts[p] / (sym_freq[p[0]] * sym_freq[p[1]])

    heap: list = []

    def push(p: tuple[int, int]) -> None:
        c = pair_counts.get(p, 0)
        if c >= max(min_frequency, 1):
            heapq.heappush(heap, (-score(p), -c, tokens[p[0]], tokens[p[1]], p))

    for p in pair_counts:
        push(p)

    while len(tokens) < vocab_size and heap:
        neg_score, neg_count, _, _, pair = heapq.heappop(heap)
        c = pair_counts.get(pair, 0)
        if c != -neg_count or c == 0 or score(pair) != -neg_score:
            continue  # stale: a fresh entry was pushed when the count or a symbol frequency changed
        a, b = pair
        rhs = tokens[b]
        new_str = tokens[a] + (rhs[len(prefix):] if rhs.startswith(prefix) else rhs)
        new = token_ids.get(new_str)
        if new is None:  # the same string can come from different pairs; it keeps one id
            new = token_ids[new_str] = len(tokens)
            tokens.append(new_str)

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            old_w = words[i]
            new_w = merge_pair(old_w, a, b, new)
            m = (len(old_w) - len(new_w)) * freqs[i]
            sym_freq[a] -= m
            sym_freq[b] -= m
            sym_freq[new] += m
            old_pairs, new_pairs = Counter(zip(old_w, old_w[1:])), Counter(zip(new_w, new_w[1:]))
            for p, n in old_pairs.items():
                delta[p] -= n * freqs[i]
            for p, n in new_pairs.items():
                delta[p] += n * freqs[i]
                where[p].add(i)
            for p in old_pairs.keys() - new_pairs.keys():
                if p != pair:
                    where[p].discard(i)
            words[i] = new_w

        changed = set()
        for p, d in delta.items():
            if d == 0:
                continue
            cnt = pair_counts.get(p, 0) + d
            if cnt > 0:
                pair_counts[p] = cnt
                pairs_of[p[0]].add(p)
                pairs_of[p[1]].add(p)
                changed.add(p)
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
                pairs_of[p[0]].discard(p)
                pairs_of[p[1]].discard(p)
        for s in (a, b, new):
            changed |= pairs_of[s]
        for p in changed:
            push(p)

    vocab = {t: i for i, t in enumerate(tokens)}
    return WordPiece(
        vocab,
        unk_token=unk_token,
        continuing_subword_prefix=prefix,
        max_input_chars_per_word=max_input_chars_per_word,
        special_tokens=special_tokens,
        normalizer=normalizer,
        cls_token="[CLS]" if "[CLS]" in vocab else None,
        sep_token="[SEP]" if "[SEP]" in vocab else None,
    )
