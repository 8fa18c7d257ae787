"""What every tokenizer model shares: a dense vocab (token -> id, ids 0..n-1), the id -> token table, and a
bounded cache from pre-token to ids in front of the model's own algorithm (`_tokenize`)."""

CACHE_LIMIT = 100_000  # pre-token -> ids cache entries; cleared when full so memory stays bounded


class VocabModel:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = dict(vocab)
        n = len(self.vocab)
        if sorted(self.vocab.values()) != list(range(n)):
            raise ValueError("vocab ids must be exactly 0..len(vocab)-1, each used once")
        self._id_to_token = [""] * n
        for tok, i in self.vocab.items():
            self._id_to_token[i] = tok
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, i: int) -> str:
        return self._id_to_token[i]

    def tokenize(self, word: str) -> list[int]:
        """Ids of one pre-token (cached)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = self._tokenize(word)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _tokenize(self, word: str) -> list[int]:
        raise NotImplementedError
