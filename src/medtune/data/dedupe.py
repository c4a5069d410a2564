"""Exact and near-duplicate removal, first occurrence wins, in the order records arrive.

Exact: a digest of the normalised question + options (or prompt + response). Near: MinHash of
word shingles (datasketch), banded into an LSH index, and each candidate confirmed by the
estimated Jaccard of the two signatures, so a band collision alone never removes a record.

Memory is the constraint at a million records: the index keeps one 8-byte digest per record, one
int key per band, and one uint32 signature row per kept record in a growing numpy array, never the
records themselves or datasketch objects.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np
from datasketch import MinHash
from datasketch.lsh import _optimal_param
from datasketch.minhash import _fmix  # private helpers of the pinned datasketch==2.0.0

from medtune.config import DedupeConfig
from medtune.data.schema import Record

_NON_WORD = re.compile(r"[^\w]+")
MAX_OPTIONS = 10
_SEED = 1  # fixed: signatures must be identical across runs for byte-identical outputs


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation to spaces, collapsed whitespace: `A. Foo!` == `a foo`."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())


def dedupe_text(record: Record) -> str:
    """What makes two records the same item: the stem and its options, or the whole exchange."""
    if record["kind"] == "mcqa":
        return "\n".join([record["question"], *record["options"]])
    return f"{record.get('prompt') or record['question']}\n{record.get('response') or ''}"


def shingle_hashes(normalised: str, k: int) -> np.ndarray:
    """32-bit hashes of the word k-grams of an already normalised text (short text: one shingle).

    Each word is hashed once (crc32) and k-grams are combined in numpy (order-sensitive FNV-style
    mixing): joining and hashing every k-gram string in Python was the single largest cost of
    prepare at a million records.
    """
    words = normalised.split()
    if len(words) <= k:
        return np.array([zlib.crc32(normalised.encode())], dtype=np.uint32)
    wh = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint32, count=len(words))
    n = len(words) - k + 1
    h = np.zeros(n, dtype=np.uint32)
    for j in range(k):
        h = (h * np.uint32(0x01000193)) ^ wh[j : j + n]
    return h


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
        # datasketch's permutations and its affine32 scheme, applied to a whole record at once
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
            sig, opts = self._signature(text), option_fingerprint(record)
            keys = self._band_keys(sig)
            match = self._near_match(sig, opts, keys)
            if match is not None:
                return "near", match
            self._register_near(sig, opts, keys, record["id"])
        self._exact.setdefault(digest, record["id"])
        return None

    def _signature(self, normalised: str) -> np.ndarray:
        """The MinHash signature, the same math as datasketch MinHash.update_batch (affine32)."""
        hv = _fmix(shingle_hashes(normalised, self.cfg.shingle_words).reshape(-1, 1), 32)
        return (hv * self._a + self._b).min(axis=0)

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
