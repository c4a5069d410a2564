"""Exact and near-duplicate removal, first occurrence wins, in the order records arrive.

Exact: a digest of the normalised question + options (or prompt + response). Near: MinHash of
word shingles (datasketch), banded into an LSH index, and each candidate confirmed by the
estimated Jaccard of the two signatures, so a band collision alone never removes a record.

Memory is the constraint at a million records: the index keeps one 8-byte digest per record, one
int key per band, and one uint32 signature row per kept record in a growing numpy array, never the
records themselves or datasketch objects.

Memory per record is bounded too: a signature is computed over `WORD_CHUNK_CHARS` characters of
words and `SHINGLE_BATCH` shingles at a time, so its working set is about `SHINGLE_BATCH * num_perm
* 4` bytes per temporary (1 MiB at 128 permutations) plus one chunk of words, whatever the size of
the field. What still grows with the text is the text itself: normalising
it peaks at about 15 bytes a character (`re.sub` keeps its pieces), and `data.max_field_chars`
bounds that. Materialising every shingle x permutation at once cost 2.7 GB for one 5 MB question
(benchmarks/dedupe_memory.py). The batching changes no result: a minimum over batches is the
minimum over all shingles.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterator

import numpy as np
from datasketch import MinHash
from datasketch.lsh import _optimal_param
from datasketch.minhash import _fmix  # private helpers of the pinned datasketch==2.0.0

from medtune.config import DedupeConfig
from medtune.data.schema import Record

_NON_WORD = re.compile(r"[^\w]+")
MAX_OPTIONS = 10
_SEED = 1  # fixed: signatures must be identical across runs for byte-identical outputs
WORD_CHUNK_CHARS = 1 << 16
"""Characters of normalised text split into words at a time (a chunk ends at the next space)."""
SHINGLE_BATCH = 2048
"""Shingles permuted at a time: bounds the (shingles x num_perm) temporaries of a signature."""


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation to spaces, collapsed whitespace: `A. Foo!` == `a foo`."""
    # After the substitution only word characters and single spaces are left, so strip() equals
    # " ".join(split()) without a list of every word (a million strings for a 5 MB field).
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def dedupe_text(record: Record) -> str:
    """What makes two records the same item: the stem and its options, or the whole exchange."""
    if record["kind"] == "mcqa":
        return "\n".join([record["question"], *record["options"]])
    return f"{record.get('prompt') or record['question']}\n{record.get('response') or ''}"


def _word_chunks(normalised: str) -> Iterator[list[str]]:
    """The words of a normalised text, about `WORD_CHUNK_CHARS` characters of them at a time."""
    start, n = 0, len(normalised)
    while start < n:
        end = n if start + WORD_CHUNK_CHARS >= n else normalised.find(" ", start + WORD_CHUNK_CHARS)
        end = n if end == -1 else end  # the last word runs to the end of the text
        yield normalised[start:end].split()
        start = end + 1


def _kgram_hashes(word_hashes: np.ndarray, k: int) -> np.ndarray:
    """Order-sensitive FNV-style mix of every k consecutive word hashes."""
    n = len(word_hashes) - k + 1
    h = np.zeros(n, dtype=np.uint32)
    for j in range(k):
        h = (h * np.uint32(0x01000193)) ^ word_hashes[j : j + n]
    return h


def shingle_hashes(normalised: str, k: int) -> Iterator[np.ndarray]:
    """32-bit hashes of the word k-grams of an already normalised text, a chunk of words at a time.

    A text of at most k words is one shingle (the crc32 of the whole text). Each word is hashed once
    (crc32) and k-grams are combined in numpy: joining and hashing every k-gram string in Python was
    the single largest cost of prepare at a million records. The last k-1 word hashes of a chunk
    carry over, so the k-grams are the same however the text is chunked.
    """
    pending = np.zeros(0, dtype=np.uint32)
    emitted = False
    for words in _word_chunks(normalised):
        hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint32, count=len(words))
        pending = np.concatenate([pending, hashes]) if len(pending) else hashes
        if len(pending) <= (k - 1 if emitted else k):
            continue
        yield _kgram_hashes(pending, k)
        emitted = True
        pending = pending[len(pending) - k + 1 :]
    if not emitted:
        yield np.array([zlib.crc32(normalised.encode())], dtype=np.uint32)


def option_fingerprint(record: Record) -> np.ndarray:
    """One nonzero crc32 per normalised option (0 = no option), for the near-duplicate option check."""
    out = np.zeros(MAX_OPTIONS, dtype=np.uint32)
    for i, option in enumerate(record["options"][:MAX_OPTIONS]):
        out[i] = zlib.crc32(normalise(option).encode()) | 1
    return out


def _same_options(a: np.ndarray, b: np.ndarray) -> bool:
    """At least half of the options agree (as a set). Records without options always agree.

    Without this, MMLU's reading passages (one long `Sauna use...` passage, five different
    questions with different options) and KorMedMCQA's reused stems would be near duplicates.
    """
    sa, sb = set(a[a > 0].tolist()), set(b[b > 0].tolist())
    if not sa and not sb:
        return True
    return len(sa & sb) * 2 >= max(len(sa), len(sb))


class Deduper:
    """Stateful filter: `check(record)` says whether a record repeats one seen before."""

    def __init__(self, cfg: DedupeConfig) -> None:
        self.cfg = cfg
        self._exact: dict[bytes, str] = {}
        self._bands, self._rows = _optimal_param(cfg.threshold, cfg.num_perm, 0.5, 0.5)
        # datasketch's permutations and its affine32 scheme, applied to a batch of shingles at once
        # (MinHash.update_batch calls a Python hash function per shingle).
        self._a, self._b = MinHash(cfg.num_perm, seed=_SEED, scheme="affine32").permutations
        self._band_index: dict[int, int] = {}
        self._sigs = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self._opts = np.zeros((1024, MAX_OPTIONS), dtype=np.uint32)
        self._ids: list[str] = []

    def check(self, record: Record) -> tuple[str, str] | None:
        """(`exact` or `near`, id of the record it duplicates), or None after registering it."""
        text = normalise(dedupe_text(record))
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        if self.cfg.exact and digest in self._exact:
            return "exact", self._exact[digest]
        if self.cfg.near:
            sig, opts = self.signature(text), option_fingerprint(record)
            keys = self._band_keys(sig)
            match = self._near_match(sig, opts, keys)
            if match is not None:
                return "near", match
            self._register_near(sig, opts, keys, record["id"])
        self._exact.setdefault(digest, record["id"])
        return None

    def signature(self, normalised: str) -> np.ndarray:
        """The MinHash signature, the same math as datasketch MinHash.update_batch (affine32).

        Permuted `SHINGLE_BATCH` shingles at a time, keeping the running minimum (see the module
        docstring for the memory bound).
        """
        sig = np.full(self.cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for hashes in shingle_hashes(normalised, self.cfg.shingle_words):
            for start in range(0, len(hashes), SHINGLE_BATCH):
                hv = _fmix(hashes[start : start + SHINGLE_BATCH].reshape(-1, 1), 32)
                np.minimum(sig, (hv * self._a + self._b).min(axis=0), out=sig)
        return sig

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        r = self._rows
        # The band number is folded into the key so one dict serves every band.
        return [hash((b, sig[b * r : (b + 1) * r].tobytes())) for b in range(self._bands)]

    def _near_match(self, sig: np.ndarray, opts: np.ndarray, keys: list[int]) -> str | None:
        seen: set[int] = set()
        for key in keys:
            slot = self._band_index.get(key)
            if slot is None or slot in seen:
                continue
            seen.add(slot)
            if float(np.mean(self._sigs[slot] == sig)) >= self.cfg.threshold and _same_options(
                self._opts[slot], opts
            ):
                return self._ids[slot]
        return None

    def _register_near(self, sig: np.ndarray, opts: np.ndarray, keys: list[int], record_id: str) -> None:
        slot = len(self._ids)
        if slot == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
            self._opts = np.concatenate([self._opts, np.zeros_like(self._opts)])
        self._sigs[slot] = sig
        self._opts[slot] = opts
        self._ids.append(record_id)
        for key in keys:
            self._band_index.setdefault(key, slot)
