"""Token shards: a tokenized corpus on disk, read through memory maps.

A shard directory holds

    index.json          format, dtype, vocab_size, eos_id, the shard files and their token counts, the token
                        offset of every document (n_documents + 1 numbers, the last = total tokens) and a
                        fingerprint of what produced it
    shard_00000.bin ... the token stream: every document's ids (then EOS) back to back, as raw uint16 when
                        the vocabulary fits (vocab <= 65536, half the bytes) else uint32; a document may
                        continue into the next shard

tokenize_to_shards writes one atomically (a temp directory renamed into place, index.json written last), and
reuses it when the fingerprint (tokenizer.json content + documents + options) matches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..progress import Bar

FORMAT = "llmlab-token-shards"
VERSION = 1
# Tried in order when the tokenizer names no eos_token: the end-of-text tokens of GPT-2, Llama 2, Llama 3.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
CHUNK_CHARS = 1 << 20  # a worker's unit of work: about 1 MB of text (or CHUNK_DOCS documents)
CHUNK_DOCS = 4096
PARALLEL_MIN_CHARS = 8 << 20  # workers=None goes parallel from here: a worker costs about a second to start


class TokenShards:
    """A shard directory written by tokenize_to_shards: len() tokens in n_documents documents."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.path} holds no token shards (no index.json); create them with "
                                    "llmlab.data.tokenize_to_shards(docs, tokenizer, out_dir)")
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_file} is not a {FORMAT} v{VERSION} index; re-create the shards")
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.fingerprint: str = index["fingerprint"]
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int | None = index["eos_id"]
        self.offsets = np.asarray(index["doc_offsets"], dtype=np.int64)  # document i = [offsets[i], offsets[i+1])
        self.n_documents = len(self.offsets) - 1
        sizes = [s["tokens"] for s in index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # shard k = [starts[k], starts[k+1])
        self._n = int(self._starts[-1])
        if self._n != int(self.offsets[-1]):
            raise ValueError(f"{index_file}: shards hold {self._n} tokens but the documents end at "
                             f"{int(self.offsets[-1])}; the directory is damaged, re-create it")
        self._maps = []
        for s in index["shards"]:
            file = self.path / s["file"]
            if not file.is_file() or file.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise ValueError(f"{file} is missing or has the wrong size for {s['tokens']} {self.dtype} tokens; "
                                 "the directory is damaged, re-create it")
            self._maps.append(np.memmap(file, dtype=self.dtype, mode="r", shape=(s["tokens"],)))
        self.reused = False  # set by tokenize_to_shards when it found these shards already written

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}: {self._n} tokens, {self.n_documents} documents, {self.dtype})"

    def tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the whole stream, across shard boundaries (read-only when the range
        lies in one shard: a view of the memory map)."""
        start, n = int(start), int(n)
        if start < 0 or n < 0 or start + n > self._n:
            raise IndexError(f"token range [{start}, {start + n}) is outside [0, {self._n})")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, pos = [], start
        k = first
        while pos < start + n:
            lo = pos - int(self._starts[k])
            hi = min(start + n, int(self._starts[k + 1])) - int(self._starts[k])
            parts.append(self._maps[k][lo:hi])
            pos += hi - lo
            k += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i, its EOS included when one was appended."""
        if not -self.n_documents <= i < self.n_documents:
            raise IndexError(f"document {i} is outside [0, {self.n_documents})")
        i %= self.n_documents
        return self.tokens(self.offsets[i], self.offsets[i + 1] - self.offsets[i])

    def document_index(self, positions: np.ndarray) -> np.ndarray:
        """The document each global token position belongs to."""
        return np.searchsorted(self.offsets, positions, side="right") - 1


def find_eos(tokenizer) -> int | None:
    """tokenizer.eos_token's id, else the first of EOS_CANDIDATES the tokenizer has, else None."""
    for token in ((tokenizer.eos_token,) if getattr(tokenizer, "eos_token", None) else ()) + EOS_CANDIDATES:
        i = tokenizer.token_to_id(token)
        if i is not None:
            return i
    return None


def _fingerprint(docs: Sequence[str], tokenizer_json: str, options: dict) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT} v{VERSION}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(tokenizer_json.encode())
    for d in docs:  # the length first: ["ab", "c"] and ["a", "bc"] must hash differently
        b = d.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _chunks(docs: Sequence[str]) -> Iterator[tuple[int, int]]:
    """[lo, hi) document ranges of about CHUNK_CHARS characters each."""
    lo, chars = 0, 0
    for i, d in enumerate(docs):
        chars += len(d)
        if chars >= CHUNK_CHARS or i + 1 - lo >= CHUNK_DOCS:
            yield lo, i + 1
            lo, chars = i + 1, 0
    if lo < len(docs):
        yield lo, len(docs)


# --- the encoding of one chunk: the same function serially and in a worker, so the output is identical ---

_worker_tokenizer = None


def _init_worker(tokenizer_json: str, config: dict) -> None:
    global _worker_tokenizer
    # the tokenizers library warns after a fork when the parent used its thread pool; one process per
    # worker is the parallelism here, so each worker runs it single-threaded
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from ..tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.from_hf_dict(json.loads(tokenizer_json), config)


def _encode_chunk(tokenizer, texts: list[str], eos_id: int | None, dtype: str, add_special_tokens: bool):
    """(tokens of the chunk back to back, each document's length), EOS included."""
    ids = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens, parse_special=False)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    if eos_id is not None:  # one vectorized insert after each document's end
        flat = np.insert(flat, np.cumsum(lengths), np.asarray(eos_id, dtype=dtype))
        lengths += 1
    return flat, lengths


def _context():
    """fork where it exists: a worker then starts in milliseconds instead of re-importing torch (seconds).
    Workers only run the tokenizer, never torch, so the parent's thread pools are not a hazard."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if sys.platform == "linux" and "fork" in methods else "spawn")


def _encode_in_worker(args):
    return _encode_chunk(_worker_tokenizer, *args)


class _ShardWriter:
    """Appends token arrays to shard_NNNNN.bin files of shard_tokens tokens each."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self.close()
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # the data is on disk before index.json says it is there
            self._file.close()
            self._file = None


def _existing(out_dir: Path, fingerprint: str) -> TokenShards | None:
    try:
        shards = TokenShards(out_dir)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return shards if shards.fingerprint == fingerprint else None


def tokenize_to_shards(docs: Sequence[str], tokenizer, out_dir: str | os.PathLike, *, append_eos: bool = True,
                       workers: int | None = None, shard_tokens: int = 2**24, progress: bool = True,
                       add_special_tokens: bool = True) -> TokenShards:
    """Tokenize documents into a shard directory and open it; reuse the directory when it already holds
    exactly these documents tokenized with this tokenizer and these options (shards.reused is then True).

    Document text is user data: special-token strings inside it are encoded as plain text. EOS
    (find_eos: tokenizer.eos_token, else <|endoftext|> and kin) follows every document when append_eos;
    without one the documents run together and a warning says so. add_special_tokens applies the
    tokenizer's post-processor (e.g. a Llama BOS) to every document.
    workers: processes that encode chunks of documents (None: one per CPU for corpora over 8 MB, else 1);
    the output is identical to the serial one."""
    if isinstance(docs, (str, bytes)) or not hasattr(docs, "__iter__"):
        raise TypeError("docs must be a list of document strings; read files with llmlab.data.read_documents")
    docs = docs if isinstance(docs, Sequence) else list(docs)
    if not docs:
        raise ValueError("no documents to tokenize; read_documents(...) gives a list of document strings")
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise TypeError(f"document {bad} is a {type(docs[bad]).__name__}, not a string")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    eos_id = find_eos(tokenizer) if append_eos else None
    if append_eos and eos_id is None:
        warnings.warn("the tokenizer has no EOS token (no eos_token and none of "
                      f"{', '.join(EOS_CANDIDATES)}): documents are concatenated without a separator; set "
                      "tokenizer.eos_token or train it with special_tokens=['<|endoftext|>']", stacklevel=2)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    tokenizer_json = json.dumps(tokenizer.to_hf_dict(), sort_keys=True, ensure_ascii=False)
    options = {"eos_id": eos_id, "add_special_tokens": add_special_tokens, "shard_tokens": shard_tokens}
    fingerprint = _fingerprint(docs, tokenizer_json, options)
    found = _existing(out_dir, fingerprint)
    if found is not None:
        found.reused = True
        return found
    if out_dir.exists() and not (out_dir / "index.json").is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a token-shard directory; pick an empty or new out_dir")

    total_chars = sum(len(d) for d in docs)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total_chars >= PARALLEL_MIN_CHARS else 1
    chunks = list(_chunks(docs))
    workers = max(1, min(int(workers), len(chunks)))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished directory should read like any other
    writer = _ShardWriter(tmp, dtype, shard_tokens)
    try:
        lengths = []
        jobs = ((docs[lo:hi], eos_id, dtype.str, add_special_tokens) for lo, hi in chunks)
        pool = None
        if workers > 1:  # started before the progress bar, whose refresh thread a fork must not copy mid-lock
            pool = _context().Pool(workers, _init_worker, (tokenizer_json, tokenizer.config_dict()))
        try:
            # imap keeps the document order, so the output equals the serial one
            results = pool.imap(_encode_in_worker, jobs) if pool else (_encode_chunk(tokenizer, *j) for j in jobs)
            with Bar(len(docs), "tokenizing", progress) as bar:
                for flat, lens in results:
                    writer.write(flat)
                    lengths.append(lens)
                    bar.update(len(lens))
        finally:
            if pool is not None:
                pool.terminate()
        writer.close()
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                 "eos_id": eos_id, "n_tokens": int(offsets[-1]), "n_documents": len(docs),
                 "shards": writer.shards, "doc_offsets": offsets.tolist(), "fingerprint": fingerprint}
        with open(tmp / "index.json", "w", encoding="utf-8") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(tmp, out_dir)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenShards(out_dir)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp directory to out_dir; an older shard directory there is moved aside first
    and deleted after, so out_dir is never half written."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
