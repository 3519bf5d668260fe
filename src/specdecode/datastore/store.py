"""The REST datastore (He et al., "REST: Retrieval-Based Speculative Decoding", NAACL 2024): a token
array and its suffix array, both ``.npy`` files read memory-mapped, plus ``meta.json``.

Layout of a datastore directory:

- ``tokens.npy``: every document's tokens, each document followed by the separator id (so the array
  always ends with it); the smallest unsigned dtype that holds the vocabulary and the separator.
- ``suffix_array.npy``: start positions of the suffixes of ``tokens`` in lexicographic order of their
  first ``SORT_DEPTH`` (16) tokens, ties by position; int32 below 2**31 tokens, else int64. Sorting by
  16 tokens rather than whole suffixes is enough: a lookup compares at most 16 tokens, and the order
  on 16-token prefixes implies the order on every shorter prefix, so each query of <= 16 tokens
  matches a contiguous range. A shorter suffix (one that runs into the end) sorts first.
- ``meta.json``: vocabulary size, separator id, counts, tokenizer name and vocabulary fingerprint,
  builder version.

The separator never matches as a normal token: a query is cut after its last separator (so a match
never spans two documents) and continuations stop at it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from specdecode.types import SpecDecodeError

FORMAT = "specdecode-rest-datastore"
BUILDER_VERSION = 1
SORT_DEPTH = 16
CACHE_SIZE = 4  # datastores kept open per process (memory maps: address space, not RAM)


def token_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0..max_id``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def build_suffix_array(tokens: np.ndarray, depth: int = SORT_DEPTH) -> np.ndarray:
    """Suffix array of ``tokens`` ordered by the first ``depth`` tokens of each suffix (rounded up to
    a power of two), ties by position, by prefix doubling: the rank by 2k tokens is the rank of the
    pair (rank by k tokens at i, rank by k tokens at i + k; 0 past the end). Each round is one sort of
    int64 keys, O(n log n); 4 rounds for 16 tokens, fewer when all ranks are already distinct.
    Memory about 6 int64 arrays of length n (10M tokens: ~0.5 GB)."""
    n = int(tokens.shape[0])
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    _, rank = np.unique(np.asarray(tokens), return_inverse=True)
    rank = rank.astype(np.int64).reshape(-1) + 1  # 1..n; 0 = past the end (sorts first)
    span = 1
    while span < depth and int(rank.max()) < n:
        second = np.zeros(n, dtype=np.int64)
        if span < n:
            second[:n - span] = rank[span:]
        key = rank * (n + 1) + second  # < 2**63 for n < 3e9
        del second
        _, rank = np.unique(key, return_inverse=True)
        del key
        rank = rank.astype(np.int64).reshape(-1) + 1
        span *= 2
    order = np.argsort(rank, kind="stable")
    return order.astype(np.int32 if n < 2**31 else np.int64)


def build_datastore_from_token_docs(docs: Iterable[Sequence[int]], out_dir: str | os.PathLike,
                                    vocab_size: int, separator: int, *,
                                    max_tokens: int | None = None, tokenizer_name: str = "",
                                    vocab_fingerprint: str = "", extra: dict | None = None) -> dict:
    """Write a datastore from token-id documents; returns the metadata written to ``meta.json``.

    ``separator`` (normally the tokenizer's pad or eos id; may equal ``vocab_size``, an id no model
    emits) ends every document. ``max_tokens`` caps the document tokens (the last one is cut).
    Raises ``SpecDecodeError`` on ids outside the vocabulary or when there are no tokens at all."""
    if vocab_size < 1:
        raise SpecDecodeError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 0 <= separator <= vocab_size:
        raise SpecDecodeError(f"separator id {separator} is outside 0..{vocab_size}")
    if max_tokens is not None and max_tokens < 1:
        raise SpecDecodeError(f"max_tokens must be >= 1, got {max_tokens}")
    dtype = token_dtype(max(vocab_size - 1, separator))
    sep = np.array([separator], dtype=dtype)
    parts: list[np.ndarray] = []
    num_docs = num_tokens = 0
    for doc in docs:
        if max_tokens is not None and num_tokens >= max_tokens:
            break
        arr = np.asarray(doc, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            continue
        if max_tokens is not None:
            arr = arr[:max_tokens - num_tokens]
        if int(arr.min()) < 0 or int(arr.max()) >= max(vocab_size, separator + 1):
            bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
            raise SpecDecodeError(f"token id {bad} is outside the vocabulary (size {vocab_size})")
        parts += [arr.astype(dtype), sep]
        num_docs += 1
        num_tokens += int(arr.size)
    if num_tokens == 0:
        raise SpecDecodeError("no tokens: the corpus is empty, nothing to put in the datastore")
    tokens = np.concatenate(parts)
    del parts
    suffix_array = build_suffix_array(tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # a half-rewritten directory must not pass for a datastore
    np.save(out / "tokens.npy", tokens)
    np.save(out / "suffix_array.npy", suffix_array)
    meta = {"format": FORMAT, "builder_version": BUILDER_VERSION, "vocab_size": int(vocab_size),
            "separator_id": int(separator), "num_documents": num_docs, "num_tokens": num_tokens,
            "array_length": int(tokens.size), "tokens_dtype": str(tokens.dtype),
            "suffix_array_dtype": str(suffix_array.dtype), "sort_depth": SORT_DEPTH,
            "tokenizer": tokenizer_name, "vocab_fingerprint": vocab_fingerprint, **(extra or {})}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    return meta


class Datastore:
    """A built datastore, read through memory maps (the OS pages in what lookups touch)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise SpecDecodeError(f"datastore directory not found: {self.path}")
        if not meta_path.is_file():
            raise SpecDecodeError(f"{self.path} is not a REST datastore (no meta.json); build one "
                                  "with `specdecode datastore build`")
        try:
            self.meta = json.loads(meta_path.read_text())
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"format is {self.meta.get('format')!r}, not {FORMAT!r}")
            tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
            suffix_array = np.load(self.path / "suffix_array.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise SpecDecodeError(f"{self.path} is not a readable REST datastore: {err}") from err
        self.vocab_size = int(self.meta["vocab_size"])
        self.separator = int(self.meta["separator_id"])
        self.sort_depth = int(self.meta.get("sort_depth", SORT_DEPTH))
        if tokens.ndim != 1 or suffix_array.shape != tokens.shape or tokens.size == 0 \
                or int(tokens[-1]) != self.separator:
            raise SpecDecodeError(f"{self.path} is a damaged REST datastore (array shapes or "
                                  "final separator wrong); rebuild it")
        # plain ndarray views of the maps: cheaper to slice than np.memmap objects
        self.tokens = tokens.view(np.ndarray)
        self.suffix_array = suffix_array.view(np.ndarray)
        self.size = int(tokens.size)

    def __len__(self) -> int:
        return self.size

    def _prefix(self, rank: int, length: int) -> list[int]:
        start = int(self.suffix_array[rank])
        return self.tokens[start:start + length].tolist()

    def find(self, query: Sequence[int]) -> tuple[int, int]:
        """Suffix-array range [lo, hi) of the suffixes that start with ``query`` (1..sort_depth
        tokens), by two binary searches: O(len(query) log n)."""
        q = [int(t) for t in query]
        if not 1 <= len(q) <= self.sort_depth:
            raise ValueError(f"query length must be 1..{self.sort_depth}, got {len(q)}")
        length, lo, hi = len(q), 0, self.size
        while lo < hi:
            mid = (lo + hi) // 2
            if self._prefix(mid, length) < q:
                lo = mid + 1
            else:
                hi = mid
        start, hi = lo, self.size
        while lo < hi:
            mid = (lo + hi) // 2
            if self._prefix(mid, length) <= q:
                lo = mid + 1
            else:
                hi = mid
        return start, lo

    def longest_match(self, context: Sequence[int], min_suffix: int = 2,
                      max_suffix: int = SORT_DEPTH) -> tuple[int, int, int] | None:
        """(length, lo, hi) for the longest suffix of ``context`` of ``min_suffix..max_suffix``
        tokens found in the datastore, or None. The part of the context before its last separator
        is ignored. Occurrence is monotone in the length (a match of L tokens contains one of every
        shorter suffix), so the length is found by binary search: O(log(max_suffix)) lookups."""
        tail = [int(t) for t in context[max(0, len(context) - max_suffix):]]
        if self.separator in tail:
            tail = tail[len(tail) - tail[::-1].index(self.separator):]
        if len(tail) < min_suffix:
            return None
        lo_len, hi_len = min_suffix, len(tail)
        best = None
        while lo_len <= hi_len:
            mid = (lo_len + hi_len) // 2 if best is not None else lo_len
            lo, hi = self.find(tail[len(tail) - mid:])
            if hi > lo:
                best, lo_len = (mid, lo, hi), mid + 1
            elif best is None:
                return None  # not even the shortest suffix occurs
            else:
                hi_len = mid - 1
        return best

    def continuations(self, lo: int, hi: int, offset: int, depth: int,
                      max_candidates: int) -> np.ndarray:
        """[m, depth] int64: the ``depth`` tokens after ``offset`` tokens of up to
        ``max_candidates`` suffixes of the range [lo, hi), -1 from the separator on. A range larger
        than ``max_candidates`` is sampled at evenly spaced ranks: the range is sorted by the
        continuation, so this is a stratified sample of it (the first m ranks would favour the
        lexicographically smallest continuations)."""
        count = hi - lo
        if count <= 0 or depth <= 0:
            return np.zeros((0, max(depth, 0)), dtype=np.int64)
        if count > max_candidates:
            ranks = lo + (np.arange(max_candidates, dtype=np.int64) * count) // max_candidates
        else:
            ranks = np.arange(lo, hi, dtype=np.int64)
        starts = self.suffix_array[ranks].astype(np.int64) + offset
        cols = np.minimum(starts[:, None] + np.arange(depth, dtype=np.int64), self.size - 1)
        rows = self.tokens[cols].astype(np.int64)  # the last token is a separator: rows stop
        stopped = np.cumsum(rows == self.separator, axis=1) > 0
        rows[stopped] = -1
        return rows


def open_datastore(path: str | os.PathLike,
                   cache: OrderedDict[tuple[str, int], Datastore] | None = None) -> Datastore:
    """The datastore at ``path``, opened once per ``cache`` (a host's: ``rest`` passes
    ``build.host``'s): an LRU cache of ``CACHE_SIZE`` entries keyed by the resolved path and the
    mtime of its meta.json (a rebuilt datastore is reopened). Without a cache: opened now."""
    stores = OrderedDict() if cache is None else cache
    resolved = Path(path).expanduser().resolve()
    try:
        stamp = (resolved / "meta.json").stat().st_mtime_ns
    except OSError:
        stamp = -1
    key = (str(resolved), stamp)
    store = stores.get(key)
    if store is None:
        store = Datastore(resolved)
        stores[key] = store
        while len(stores) > CACHE_SIZE:
            stores.popitem(last=False)
    stores.move_to_end(key)
    return store
