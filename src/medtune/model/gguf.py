"""Import a GGUF checkpoint as an ordinary model directory (safetensors + config + tokenizer).

Small pretrained models are easiest to get, offline and licence-clean, as GGUF files (llama.cpp's
format). Training needs dense weights, so the import dequantises once and writes the same kind of
directory every other stage loads: `config.json`, `model.safetensors`, the tokenizer (with its chat
template when the GGUF carries one) and `generation_config.json`. Nothing downstream knows the model
came from a GGUF.

The header is read with the `gguf` package first: a truncated download, a file that is not a GGUF, an
architecture or quantisation transformers cannot dequantise all stop here with a `ModelError` naming
the file, before the minute-long load. The written directory is then checked against transformers' own
dequantised load of the GGUF: same token ids and same logits on an English and a Korean prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medtune.errors import ModelError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Prompts the written directory must reproduce. Korean matters here: a tokenizer that lost its merges
# or byte fallback still encodes English fine.
PARITY_PROMPTS = (
    "The patient presents with chest pain radiating to the left arm and shortness of breath.",
    "고혈압 환자의 치료에는 생활습관 교정과 약물 치료가 포함된다.",
)

# Architectures transformers lists for GGUF that are not decoder-only causal LMs: medtune cannot train them.
_NOT_CAUSAL = {"t5", "umt5", "general", "tokenizer"}

_FLOAT_TYPES = {"F32", "F16", "BF16"}

IMPORT_RECORD = "import.json"


@dataclass(frozen=True)
class GgufSummary:
    """What the header of a GGUF file says, read without touching the tensor data."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: dict[str, int]
    """ggml type name -> number of tensors stored in it (e.g. {"Q4_K": 27, "F32": 109})."""
    chat_template: str | None
    license: str | None
    metadata: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so a 500 MB model never sits in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def supported_architectures() -> set[str]:
    """GGUF `general.architecture` values transformers can turn into a causal LM, asked of transformers."""
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return (set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - _NOT_CAUSAL


def supported_tensor_types(architecture: str) -> set[str]:
    """ggml storage types transformers can dequantise for `architecture`.

    transformers has two GGUF loaders: the newer one (its `GGUF_ARCHS`) dequantises with its own torch
    kernels, the legacy one (llama, gemma3, ...) with `gguf.quants.dequantize`. Each knows different
    types, so the answer depends on which loader the architecture goes through.
    """
    from gguf import quants
    from transformers.integrations.gguf.dequant import GGML_NAME
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

    if architecture in GGUF_ARCHS:
        return _FLOAT_TYPES | set(GGML_NAME.values())
    # `_type_traits` is private, but it is the exact table `gguf.quants.dequantize` dispatches on.
    return {"F32", "F16"} | {t.name for t in quants._type_traits}


def read_gguf_header(gguf_file: Path, expected_sha256: str | None = None) -> GgufSummary:
    """Check that `gguf_file` is a complete GGUF this import can handle; raise ModelError if not."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file}: GGUF file not found")
    if expected_sha256 is not None:
        actual = sha256_file(gguf_file)
        if actual != expected_sha256.lower():
            raise ModelError(
                f"{gguf_file}: sha256 is {actual}, expected {expected_sha256}; the download is corrupt "
                "or a different file. Delete it and fetch again."
            )
    reader = _open_reader(gguf_file)
    _check_not_truncated(reader, gguf_file)
    # Only the small fields: decoding `tokenizer.ggml.tokens` (262k strings for Gemma) would cost seconds.
    fields = {
        key: _field_value(reader, key)
        for key in reader.fields
        if key.startswith("general.") or key == "tokenizer.chat_template"
    }
    architecture = str(fields.get("general.architecture", ""))
    if architecture not in supported_architectures():
        raise ModelError(
            f"{gguf_file}: architecture {architecture!r} is not supported; transformers "
            f"can import these GGUF architectures as causal LMs: {sorted(supported_architectures())}"
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    unsupported = sorted(set(types) - supported_tensor_types(architecture))
    if unsupported:
        raise ModelError(
            f"{gguf_file}: tensor storage type(s) {unsupported} cannot be dequantised by transformers "
            f"for {architecture!r}; re-quantise the model with another type (e.g. Q4_K_M or Q8_0)"
        )
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelError(f"{gguf_file}: the GGUF has no tokenizer (no tokenizer.ggml.tokens); cannot import")
    return GgufSummary(
        path=gguf_file,
        architecture=architecture,
        name=_as_optional_str(fields.get("general.name")),
        tensor_types=dict(types),
        chat_template=_as_optional_str(fields.get("tokenizer.chat_template")),
        license=_as_optional_str(fields.get("general.license")),
        metadata={
            k: str(v)
            for k, v in fields.items()
            if isinstance(v, str | int) and k != "tokenizer.chat_template"
        },
    )


def _open_reader(gguf_file: Path):
    """GGUFReader over the file, with its many failure modes on a bad file turned into one ModelError."""
    from gguf import GGUFReader

    with gguf_file.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{gguf_file}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(gguf_file)
    # With the right magic, the reader fails on a short file with whatever numpy raised at the offset
    # it gave up on (a reshape or view ValueError, an IndexError): in practice a download cut short.
    except (ValueError, IndexError, KeyError, OSError, EOFError, OverflowError, TypeError) as err:
        raise ModelError(
            f"{gguf_file}: truncated or corrupt GGUF ({type(err).__name__}: {err}). "
            "Delete it and fetch again."
        ) from err


def _check_not_truncated(reader, gguf_file: Path) -> None:
    """A download cut short can still have a whole header; the tensor data must reach each tensor's end."""
    size = gguf_file.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise ModelError(
                f"{gguf_file}: truncated: tensor {tensor.name} ends at byte {end} but the file has {size} "
                "bytes. Delete it and fetch again."
            )


def _field_value(reader, key: str) -> object:
    """One metadata value as a Python scalar, string or list (the reader returns raw numpy parts)."""
    try:
        return reader.fields[key].contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _as_optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def import_gguf(
    gguf_file: Path,
    out_dir: Path,
    dtype: str = "bfloat16",
    *,
    expected_sha256: str | None = None,
) -> Path:
    """Dequantise `gguf_file` into the model directory `out_dir`, verify it, and return `out_dir`.

    Written to a temporary folder beside `out_dir` and renamed only after the parity check passes, so
    `out_dir` is either absent or complete. `out_dir/import.json` records the source sha256, storage
    types, and the max abs logit difference per parity prompt.
    """
    if dtype not in DTYPES:
        raise ModelError(f"{gguf_file}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"{out_dir}: already exists and is not empty; remove it or choose another folder")
    started = time.monotonic()
    summary = read_gguf_header(Path(gguf_file), expected_sha256)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.importing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model, tokenizer = _load_dequantized(summary, DTYPES[dtype])
        _save_model_dir(model, tokenizer, summary, staging)
        diffs = verify_parity(model, tokenizer, staging, DTYPES[dtype])
        record = _import_record(summary, dtype, diffs, time.monotonic() - started)
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a folder
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _load_dequantized(summary: GgufSummary, torch_dtype: torch.dtype):
    """transformers' own GGUF load, dense: the reference the written directory is checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(summary.path.parent), summary.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Packed GGUF weights (the default) refuse save_pretrained; dequantize=True gives dense ones.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch_dtype
        )
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ModelError(f"{summary.path}: transformers could not load the GGUF: {err}") from err
    if summary.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = summary.chat_template
    return model.eval(), tokenizer


def _save_model_dir(model, tokenizer, summary: GgufSummary, folder: Path) -> None:
    """Write the dense model, tokenizer and generation config the way every other stage expects."""
    folder.mkdir(parents=True)
    # `_name_or_path` would otherwise record the temp folder the GGUF sat in; keep the model's name.
    model.config._name_or_path = summary.name or summary.path.stem
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)  # safetensors; also sets config.architectures to the class name
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def verify_parity(
    reference, reference_tokenizer, model_dir: Path, torch_dtype: torch.dtype
) -> dict[str, float]:
    """Reload `model_dir` and compare with the in-memory reference; return max abs logit diff per prompt.

    The token ids must match exactly (the saved tokenizer is the GGUF's), and the logits within one
    bf16 step at the logits' scale (2**-7 relative): the weights are bit-identical, so anything larger
    means the config or the tokenizer did not survive the round trip.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    diffs: dict[str, float] = {}
    for prompt in PARITY_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref_ids = reference_tokenizer(prompt, return_tensors="pt").input_ids
        if not torch.equal(ids, ref_ids):
            raise ModelError(
                f"{model_dir}: the saved tokenizer encodes {prompt!r} differently from the GGUF's "
                f"({ids.tolist()} vs {ref_ids.tolist()})"
            )
        got = model(input_ids=ids).logits.float()
        want = reference(input_ids=ids).logits.float()
        diff = (got - want).abs().max().item()
        tolerance = 2**-7 * max(1.0, want.abs().max().item())
        if not np.isfinite(diff) or diff > tolerance:
            raise ModelError(
                f"{model_dir}: logits differ from the GGUF load by {diff:.4g} (tolerance {tolerance:.4g}) "
                f"on {prompt!r}; the import is not faithful"
            )
        diffs[prompt] = diff
    return diffs


def _import_record(summary: GgufSummary, dtype: str, diffs: dict[str, float], seconds: float) -> dict:
    """What `import.json` holds: enough to tell later which file a model directory came from."""
    import transformers

    return {
        "source_file": summary.path.name,
        "source_sha256": sha256_file(summary.path),
        "architecture": summary.architecture,
        "name": summary.name,
        "license": summary.license,
        "tensor_types": summary.tensor_types,
        "chat_template": summary.chat_template is not None,
        "dtype": dtype,
        "parity_max_abs_diff": diffs,
        "transformers_version": transformers.__version__,
        "seconds": round(seconds, 1),
    }
