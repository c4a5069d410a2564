"""The tokenised training set on disk: flat int32 token ids plus an index, memory-mapped by every rank.

Tokenising a million records in Python takes ~25 minutes and ~30 bytes of RSS per token on every
rank, at every start and every `--resume`. The store pays that once: `build_token_store` writes

    prepare/tokens/<key>/ids.bin             every example's input_ids back to back, int32 little-endian
    prepare/tokens/<key>/offsets.npy         int64, n+1: example i is ids[offsets[i]:offsets[i+1]]
    prepare/tokens/<key>/prompt_tokens.npy   int32, n: where example i's targets start (see below)
    prepare/tokens/<key>/meta.json           what the key was computed from, and the counts

and `open_token_store` maps them read-only, so ranks share the page cache instead of each holding
its own lists. Labels are not stored: `format.shifted_labels` derives them from the ids and the
prompt length (4 bytes per token on disk instead of 8). `prompt_tokens` is the first trained
position under `train_on_prompt: false`, i.e. `max(prompt length, 1)`, or the example's length when
nothing is trained; under `train_on_prompt: true` the labels do not depend on it. So one store
serves both settings, and `train_on_prompt` is not part of the key.

The key hashes everything the ids depend on: the tokenizer files, the format settings that change
the rendered text (template, prompt_language, include_explanation), train.jsonl's sha256, the
source of `medtune/format.py` and the tokenizer library versions. `max_seq_len` and `overlong` act
at collation, not here. A store is built in a temporary folder and renamed into place, so a
half-written store is never read; building twice gives the same bytes. A store for other inputs is
left in place (another config, e.g. a sweep over templates, may still use it): delete
prepare/tokens/ to reclaim the space.

Multi-node rule: global rank 0 builds and the other ranks wait at a barrier, so the prepare folder
must be on storage every node sees, or the store must be built on each node beforehand (one
process calling `ensure_token_store`). The barrier is bounded by the process group's timeout
(torch's default for NCCL: 10 minutes), so a set that takes longer to tokenise on rank 0's cores
should also be built beforehand.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtune.config import FormatConfig, ModelConfig
from medtune.data.manifest import MANIFEST_NAME, sha256_file, write_json
from medtune.errors import DataError
from medtune.format import IGNORE_INDEX, Example, shifted_labels, tokenize_example
from medtune.model.load import load_tokenizer
from medtune.progress import progress_bar

STORE_LAYOUT = 1
"""Bumped when the files' layout changes, so older stores are rebuilt rather than misread."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files in a model directory that can change how text becomes ids (absent ones are skipped)."""
_CHUNK_BYTES = 1 << 20
"""Bytes of train.jsonl per work item: ~1.5k records, small enough for a smooth progress bar."""
_PARALLEL_FROM_BYTES = 4 << 20
"""Below this a pool costs more than it saves: each worker imports transformers (seconds)."""


@dataclass(frozen=True)
class TokenStore:
    """A mapped store: `ids[offsets[i]:offsets[i+1]]` are example i's input_ids."""

    path: Path
    ids: np.ndarray
    offsets: np.ndarray
    prompt_tokens: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def has_target(self, train_on_prompt: bool) -> np.ndarray:
        """Per example, whether any label is trained (`shifted_labels`: positions first-1 .. n-2)."""
        first = 1 if train_on_prompt else np.maximum(self.prompt_tokens, 1)
        return self.lengths > first


class StoredExamples(Sequence[Example]):
    """The examples `collate` indexes, read from the store on access: `[i]` slices the mapped ids.

    `indices` picks which stored examples are visible (e.g. those with a target), so index i here
    is stored example `indices[i]`. Only the few examples of a micro-batch become Python lists.
    """

    def __init__(self, store: TokenStore, indices: np.ndarray, train_on_prompt: bool) -> None:
        self.store = store
        self.indices = indices
        self.train_on_prompt = train_on_prompt

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        j = int(self.indices[i])
        start, end = int(self.store.offsets[j]), int(self.store.offsets[j + 1])
        ids = self.store.ids[start:end].tolist()
        labels = shifted_labels(ids, int(self.store.prompt_tokens[j]), self.train_on_prompt)
        return {"input_ids": ids, "labels": labels}

    def lengths(self) -> list[int]:
        """Token counts of the visible examples, read from the index (no ids touched)."""
        return self.store.lengths[self.indices].tolist()


def training_examples(store: TokenStore, train_on_prompt: bool) -> tuple[StoredExamples, int]:
    """The examples worth training on, and how many were left out for having no target token."""
    keep = store.has_target(train_on_prompt)
    return StoredExamples(store, np.flatnonzero(keep), train_on_prompt), int(len(keep) - keep.sum())


# ---------------------------------------------------------------------------------------------- key


def store_inputs(prepare_dir: Path, model: ModelConfig, packing: FormatConfig) -> dict[str, Any]:
    """Everything the stored ids depend on; the store's key is a hash of this."""
    import tokenizers
    import transformers

    model_dir = Path(model.path)
    return {
        "layout": STORE_LAYOUT,
        "tokenizer_files": {
            name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()
        },
        "packing": {
            "template": packing.template,
            "prompt_language": packing.prompt_language,
            "include_explanation": packing.include_explanation,
        },
        "train_jsonl_sha256": train_sha256(prepare_dir),
        "format_py_sha256": sha256_file(Path(__file__).parents[1] / "format.py"),
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }


def train_sha256(prepare_dir: Path) -> str:
    """train.jsonl's sha256: the manifest's when its recorded size still matches the file, else hashed.

    The size check catches a train.jsonl replaced after `prepare` without a new manifest.
    """
    train = prepare_dir / "train.jsonl"
    manifest = prepare_dir / MANIFEST_NAME
    if manifest.is_file():
        entry = json.loads(manifest.read_text(encoding="utf-8")).get("files", {}).get("train.jsonl", {})
        if entry.get("sha256") and entry.get("bytes") == train.stat().st_size:
            return entry["sha256"]
    return sha256_file(train)


def store_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def store_path(prepare_dir: Path, inputs: dict[str, Any]) -> Path:
    return prepare_dir / "tokens" / store_key(inputs)


def why_rebuild(prepare_dir: Path, inputs: dict[str, Any]) -> str:
    """Which inputs differ from the newest existing store's (for the rebuild message)."""
    metas = sorted((prepare_dir / "tokens").glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    if not metas:
        return "no token store yet"
    old = json.loads(metas[-1].read_text(encoding="utf-8"))["inputs"]
    changed = [k for k in sorted(inputs) if old.get(k) != inputs[k]]
    for section in ("packing", "tokenizer_files", "versions"):
        if section in changed:
            changed.remove(section)
            before = old.get(section) or {}
            keys = set(before) | set(inputs[section])
            changed += [f"{section}.{k}" for k in sorted(keys) if before.get(k) != inputs[section].get(k)]
    return f"{metas[-1].parent} was built from other inputs (changed: {', '.join(changed)})"


# ---------------------------------------------------------------------------------------------- build


def ensure_token_store(
    prepare_dir: Path,
    model: ModelConfig,
    packing: FormatConfig,
    inputs: dict[str, Any],
    workers: int | None = None,
) -> tuple[Path, bool]:
    """The store's folder for `inputs` (from `store_inputs`), built first if missing; (path, built).

    Prints one line saying which store is used, or why a new one is being built.
    """
    path = store_path(prepare_dir, inputs)
    if (path / "meta.json").is_file():
        print(f"train: reusing token store {path}")
        return path, False
    print(f"train: building token store {path}: {why_rebuild(prepare_dir, inputs)}")
    build_token_store(prepare_dir, model, packing, inputs, path, workers)
    return path, True


Part = tuple[np.ndarray, np.ndarray, np.ndarray]
"""A run of consecutive examples: (their ids back to back, their lengths, their prompt_tokens)."""


def build_token_store(
    prepare_dir: Path,
    model: ModelConfig,
    packing: FormatConfig,
    inputs: dict[str, Any],
    path: Path,
    workers: int | None = None,
) -> None:
    """Tokenise train.jsonl into `path`, in parallel over contiguous chunks, with a progress bar."""
    train = prepare_dir / "train.jsonl"
    chunks = _chunks(train)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if train.stat().st_size >= _PARALLEL_FROM_BYTES else 1
    workers = max(1, min(workers, len(chunks)))
    with progress_bar("tokenise", len(chunks)) as advance:

        def parts() -> Iterator[Part]:
            for part in _tokenised_chunks(train, chunks, model, packing, workers):
                yield part
                advance()

        write_token_store(path, inputs, parts())


def write_token_store(path: Path, inputs: dict[str, Any], parts: Iterable[Part]) -> None:
    """Write the store from its parts in order, into a temp folder renamed to `path` when complete."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_parts(tmp, inputs, parts)
    except BaseException:  # a failed or interrupted build leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "meta.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process finished the same store first: same bytes, keep theirs


def _write_parts(tmp: Path, inputs: dict[str, Any], parts: Iterable[Part]) -> None:
    lengths: list[np.ndarray] = []
    prompts: list[np.ndarray] = []
    with (tmp / "ids.bin").open("wb") as out:
        for ids, lens, prompt in parts:
            out.write(ids.astype("<i4", copy=False).tobytes())
            lengths.append(lens)
            prompts.append(prompt)
    lens_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lens_all)]).astype("<i8"))
    np.save(tmp / "prompt_tokens.npy", np.concatenate(prompts or [np.zeros(0)]).astype("<i4"))
    counts = {"examples": len(lens_all), "tokens": int(lens_all.sum())}
    write_json(tmp / "meta.json", {"inputs": inputs, **counts})  # last: its presence marks a store


def _chunks(train: Path) -> list[tuple[int, int]]:
    """Byte ranges of train.jsonl of ~_CHUNK_BYTES each, cut after a newline."""
    size = train.stat().st_size
    cuts = [0]
    with train.open("rb") as f:
        for pos in range(_CHUNK_BYTES, size, _CHUNK_BYTES):
            if pos <= cuts[-1]:
                continue
            f.seek(pos)
            f.readline()
            cuts.append(f.tell())
    if cuts[-1] < size:
        cuts.append(size)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _tokenised_chunks(
    train: Path, chunks: list[tuple[int, int]], model: ModelConfig, packing: FormatConfig, workers: int
) -> Iterator[Part]:
    """Each chunk's (ids, lengths, prompt_tokens), in file order."""
    # train_on_prompt off: the first trained position is then the prompt length (module docstring).
    packing = packing.model_copy(update={"train_on_prompt": False})
    if workers == 1:
        tokenizer = load_tokenizer(model)  # local: the trainer must not keep it after the build
        yield from (_tokenise_chunk(tokenizer, packing, train, a, b) for a, b in chunks)
        return
    # spawn, not fork: the trainer may already hold CUDA and tokenizer threads, which fork breaks.
    # No pool initializer loads the tokenizer: one that raises is restarted forever (a hang), while
    # an error inside a job reaches this process.
    jobs = [(model, packing, train, a, b) for a, b in chunks]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_worker_chunk, jobs)


_WORKER_TOKENIZER: dict[Path, Any] = {}
"""In a pool worker, the tokenizer, loaded by the worker's first chunk."""


def _worker_chunk(job: tuple[ModelConfig, FormatConfig, Path, int, int]) -> Part:
    model, packing, path, start, end = job
    if model.path not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[model.path] = load_tokenizer(model)
    return _tokenise_chunk(_WORKER_TOKENIZER[model.path], packing, path, start, end)


def _tokenise_chunk(tokenizer: Any, packing: FormatConfig, path: Path, start: int, end: int) -> Part:
    """Bytes [start, end) of train.jsonl, one record a line, as a Part."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    ids: list[int] = []
    lengths, prompts = [], []
    for record in _chunk_records(data, start, path):
        example = tokenize_example(record, tokenizer, packing)
        ids += example["input_ids"]
        lengths.append(len(example["input_ids"]))
        prompts.append(_first_trained(example))
    return np.asarray(ids, dtype=np.int32), np.asarray(lengths, dtype=np.int64), np.asarray(prompts, np.int32)


def _chunk_records(data: bytes, start: int, path: Path) -> Iterator[dict[str, Any]]:
    """The records in `data`, the bytes of `path` from offset `start`; a bad line is named by the byte
    it ends at, since a worker sees only its chunk and not line numbers."""
    at = start
    for line in data.split(b"\n"):
        at += len(line) + 1
        if line.strip():
            yield _parse_line(line, path, at - 1)


def _parse_line(line: bytes, path: Path, end: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: the line ending at byte {end} is not JSON: {exc}") from None


def _first_trained(example: Example) -> int:
    """One past the first position with a label: the trained positions start there."""
    for t, label in enumerate(example["labels"]):
        if label != IGNORE_INDEX:
            return t + 1
    return len(example["labels"])


# ---------------------------------------------------------------------------------------------- open


def open_token_store(path: Path) -> TokenStore:
    """Map a built store read-only: nothing is read until an example is used."""
    offsets = np.load(path / "offsets.npy", mmap_mode="r")
    ids = np.memmap(path / "ids.bin", dtype="<i4", mode="r") if offsets[-1] else np.zeros(0, np.int32)
    return TokenStore(path, ids, offsets, np.load(path / "prompt_tokens.npy", mmap_mode="r"))
