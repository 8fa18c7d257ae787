"""Token logprobs in OpenAI's two shapes: chat's {"content": [{token, logprob, bytes, top_logprobs}]} and the
legacy completions' parallel lists {tokens, token_logprobs, top_logprobs, text_offset}."""

from __future__ import annotations

from ..tokenizer.bytelevel import UNICODE_TO_BYTE


class LogprobFormatter:
    def __init__(self, tok) -> None:
        self.tok = tok
        decoders = [tok.decoder, *getattr(tok.decoder, "decoders", ())]
        self.byte_level = any(type(d).__name__ == "ByteLevelDecoder" for d in decoders)
        self.added_ids = {t.id for t in tok.added_tokens}

    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid])

    def token_bytes(self, tid: int) -> list[int]:
        """The token's own bytes: for byte-level BPE the bytes its symbols stand for (a piece of a multi-byte
        character decodes to U+FFFD, but its bytes are exact); otherwise the UTF-8 of its text."""
        raw = self.tok.id_to_token(tid)
        if self.byte_level and tid not in self.added_ids and all(c in UNICODE_TO_BYTE for c in raw):
            return [UNICODE_TO_BYTE[c] for c in raw]
        return list(self.token_str(tid).encode("utf-8"))

    def _entry(self, tid: int, lp: float) -> dict:
        return {"token": self.token_str(tid), "logprob": lp, "bytes": self.token_bytes(tid)}

    def chat(self, lps) -> list[dict]:
        """The "content" list of a chat choice's logprobs."""
        return [{**self._entry(x.token_id, x.logprob),
                 "top_logprobs": [self._entry(t, v) for t, v in x.top.items()]} for x in lps]

    def completion(self, lps, offset: int = 0) -> dict:
        """A completion choice's logprobs; offset: where the first token's text starts in the choice's text."""
        tokens, values, tops, offsets = [], [], [], []
        for x in lps:
            s = self.token_str(x.token_id)
            tokens.append(s)
            values.append(x.logprob)
            tops.append({self.token_str(t): v for t, v in x.top.items()})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
