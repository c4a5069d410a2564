"""Ship a trained run: a merged model, the adapter alone, or a GGUF file, each verified before it lands.

Three formats, one per way hospitals serve models:

- `merged`: base weights in bf16 (or fp32) with the LoRA folded in, as a plain Hugging Face folder
  that transformers and vLLM load with no peft. The base is loaded in full precision, never 4-bit:
  merging into a quantised base re-quantises and shifts every output.
- `peft`: the adapter alone plus a README naming the exact base (path, weight sha256, config hash),
  for vLLM / TGI multi-LoRA serving, where one base serves many adapters.
- `gguf`: one file for llama.cpp / Ollama (`medtune.model.gguf_export`), with an Ollama Modelfile.

Every export is checked against the model it came from (base + adapter, fp32, unmerged) before it is
renamed into place, by the fixed probes of `medtune.model.probe` (logits on fixed prompts, letters on
fixed MCQA items; a GGUF file also read back and loaded by transformers' own importer). The figures
go to `export.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from medtune.config import RunConfig, validate_config
from medtune.errors import ConfigError, ModelError, RunDirError
from medtune.evaluate.guard import export_verdict
from medtune.manifest import package_versions, write_json_atomic
from medtune.model.probe import check_readback, compare_probes, probe, release_memory, transformers_gguf_check

Format = Literal["merged", "peft", "gguf"]


# ----------------------------------------------------------------------------- the run directory


def read_run(run_dir: Path) -> tuple[RunConfig, Path]:
    """(resolved config, adapter folder) of a finished training run; RunDirError naming what is missing."""
    train_dir = Path(run_dir) / "train"
    run_json, adapter = train_dir / "run.json", train_dir / "adapter"
    if not Path(run_dir).is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not run_json.is_file():
        raise RunDirError(f"{run_json}: missing; `medtune export` needs a finished `medtune train` run")
    if not (adapter / "adapter_config.json").is_file():
        raise RunDirError(f"{adapter}: no trained adapter (adapter_config.json missing); train first")
    try:
        raw = json.loads(run_json.read_text(encoding="utf-8"))["config"]
        cfg = validate_config(raw, where=str(run_json))
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise RunDirError(f"{run_json}: not a medtune train manifest with a `config` ({exc})") from None
    return cfg, adapter


def full_precision(cfg: RunConfig, dtype: str) -> RunConfig:
    """The run's config with quantisation off: export merges into real weights, not 4-bit ones."""
    cfg = cfg.model_copy(deep=True)
    cfg.quantization.mode = "none"
    cfg.model.dtype = dtype  # type: ignore[assignment]
    return cfg


def load_pair(cfg: RunConfig, adapter: Path | None, dtype: str, merge: bool):
    """(model, tokenizer): the full-precision base with the adapter on top, merged or not."""
    from medtune.model.load import load_model_for_inference

    return load_model_for_inference(full_precision(cfg, dtype), adapter, merge=merge)


# ----------------------------------------------------------------------------- atomic output


def refuse_overlap(out_dir: Path, run_dir: Path, model_dir: Path) -> None:
    """RunDirError for an `out_dir` that is or holds the run, or overlaps what the export reads.

    `out_dir` is replaced wholesale, so it must keep clear of train/ (adapter, run.json) and of the
    base model. Anywhere else inside the run is fine: the default is RUN/export/FORMAT.
    """
    out, run = out_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents:
        raise RunDirError(f"{out_dir}: must not be the run directory or contain it; choose another --out")
    for read in (run / "train", model_dir.resolve()):
        if out == read or read in out.parents or out in read.parents:
            raise RunDirError(f"{out_dir}: overlaps {read}, which the export reads; choose another --out")


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temp folder next to `out_dir`, renamed onto it only if the block (export + checks) succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "export.json").is_file():
        raise RunDirError(f"{out_dir}: exists and is not a medtune export; choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files in name order (the base's safetensors shards)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_identity(model_dir: Path) -> dict[str, str]:
    """What pins the base model an adapter needs: its path, weight hash and config.json hash."""
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{model_dir}: no *.safetensors weights to hash")
    config = (model_dir / "config.json").read_bytes()
    return {
        "path": str(model_dir),
        "weights_sha256": sha256_files(weights),
        "config_sha256": hashlib.sha256(config).hexdigest(),
    }


# ----------------------------------------------------------------------------- formats


def export_merged(
    cfg: RunConfig, adapter: Path, out: Path, dtype: str, ref: dict[str, Any]
) -> dict[str, Any]:
    """Merge in `dtype`, save a plain HF folder, reload it as a user would, compare with `ref`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_pair(cfg, adapter, dtype, merge=True)
    device = next(model.parameters()).device
    model.save_pretrained(out, safe_serialization=True)
    del model
    release_memory()
    # The base folder's tokenizer, untouched (the loader may have set pad = eos for batching).
    AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True).save_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).to(device)
    figures = compare_probes(ref, probe(exported.eval(), tokenizer), dtype)
    del exported
    release_memory()
    return figures


def export_peft(cfg: RunConfig, adapter: Path, out: Path, ref: dict[str, Any]) -> dict[str, Any]:
    """Copy the adapter, pin its base in README.md, reload it with peft onto a fresh base, compare."""
    from peft import PeftModel

    shutil.copytree(adapter, out, dirs_exist_ok=True)
    identity = base_identity(Path(cfg.model.path))
    (out / "README.md").write_text(peft_readme(identity, cfg), encoding="utf-8")
    base, tokenizer = load_pair(cfg, None, "float32", merge=False)
    reloaded = PeftModel.from_pretrained(base, out, is_trainable=False).eval()
    figures = compare_probes(ref, probe(reloaded, tokenizer), "float32")
    del base, reloaded
    release_memory()
    return {**figures, "base_model": identity}


def peft_readme(identity: dict[str, str], cfg: RunConfig) -> str:
    return f"""# LoRA adapter (medtune)

Load this adapter only on the exact base model below; on any other weights it produces garbage.

| | |
|---|---|
| base model path | `{identity["path"]}` |
| base weights sha256 (all *.safetensors, by name) | `{identity["weights_sha256"]}` |
| base config.json sha256 | `{identity["config_sha256"]}` |
| medtune run config hash | `{cfg.config_hash()}` |
| LoRA r / alpha / targets | {cfg.lora.r} / {cfg.lora.alpha} / {cfg.lora.target_modules} |

Serve with vLLM multi-LoRA:

    vllm serve {identity["path"]} --enable-lora \
        --lora-modules medtune=<this folder> --max-lora-rank {cfg.lora.r}

Check the base on the serving machine first (`sha256sum` alone gives a different digest):

    python -c "import pathlib, medtune.export as e; print(e.base_identity(pathlib.Path('BASE')))"
"""


def export_gguf(
    cfg: RunConfig, adapter: Path, out: Path, gguf_type: str, ref: dict[str, Any]
) -> dict[str, Any]:
    """Merge in fp32 (so f16/Q8_0 round once), write GGUF + Modelfile, read back, load with transformers."""
    from medtune.model.gguf_export import ollama_modelfile, write_gguf

    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out.parent) as work:
        merged = Path(work)
        model, tokenizer = load_pair(cfg, adapter, "float32", merge=True)
        model.save_pretrained(merged, safe_serialization=True)
        del model
        release_memory()
        _save_base_tokenizer(cfg.model.path, merged)
        written = write_gguf(merged, out / "model.gguf", gguf_type, name=Path(cfg.model.path).name)
        readback = check_readback(merged, out / "model.gguf", gguf_type)
    stop = _stop_tokens(tokenizer)
    (out / "Modelfile").write_text(
        ollama_modelfile("model.gguf", written["architecture"], stop), encoding="utf-8"
    )
    figures = transformers_gguf_check(out, tokenizer, ref, gguf_type)
    figures["passed"] = figures["passed"] and readback["passed"]
    return {**figures, "readback": readback, "gguf": {k: v for k, v in written.items() if k != "types"}}


def _save_base_tokenizer(model_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_path, local_files_only=True).save_pretrained(out)


def _stop_tokens(tokenizer: Any) -> list[str]:
    """EOS plus the end-of-turn markers of the chat template (Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>`)."""
    vocab = tokenizer.get_vocab()
    stop = [tokenizer.eos_token] if tokenizer.eos_token else []
    return stop + [t for t in ("<|eot_id|>", "<end_of_turn>") if t in vocab and t not in stop]


# ----------------------------------------------------------------------------- entry point


def run_export(
    run_dir: Path,
    fmt: Format,
    out_dir: Path,
    gguf_type: str = "f16",
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
    force: bool = False,
) -> Path:
    """Export `run_dir`'s trained adapter as `fmt` into `out_dir` (replaced atomically); return out_dir.

    Raises ModelError, leaving any earlier export in place, when the verification fails, and GuardFailed
    before any work when the run's eval/guard.json says the model failed its forgetting guard (unless
    `force`; export.json records the verdict either way).
    """
    _check_options(fmt, gguf_type, dtype)
    cfg, adapter = read_run(Path(run_dir))
    guard = export_verdict(Path(run_dir), force)
    out_dir = Path(out_dir)
    refuse_overlap(out_dir, Path(run_dir), Path(cfg.model.path))
    model, tokenizer = load_pair(cfg, adapter, "float32", merge=False)
    ref = probe(model, tokenizer)
    del model
    release_memory()
    with staging_dir(out_dir) as tmp:
        if fmt == "merged":
            figures = export_merged(cfg, adapter, tmp, dtype, ref)
        elif fmt == "peft":
            figures = export_peft(cfg, adapter, tmp, ref)
        else:
            figures = export_gguf(cfg, adapter, tmp, gguf_type, ref)
        record = {
            "format": fmt,
            "run_dir": str(Path(run_dir).resolve()),
            "base_model": str(cfg.model.path),
            "config_hash": cfg.config_hash(),
            "dtype": dtype if fmt == "merged" else None,
            "gguf_type": gguf_type if fmt == "gguf" else None,
            "prompt_format": cfg.format.model_dump(mode="json"),  # what `medtune chat` renders with
            "verification": figures,
            "guard": guard,
            "versions": package_versions(),
        }
        write_json_atomic(tmp / "export.json", record)
        if not figures["passed"]:
            raise ModelError(f"export to {out_dir} failed its verification: {_summary(figures)}")
    return out_dir


def _check_options(fmt: str, gguf_type: str, dtype: str) -> None:
    """ConfigError for a format, GGUF type or dtype export does not write, before any model loads."""
    from medtune.model.gguf_export import GGUF_TYPES

    if fmt not in ("merged", "peft", "gguf"):
        raise ConfigError(f"export format must be merged, peft or gguf, got {fmt!r}")
    if dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def _summary(figures: dict[str, Any]) -> str:
    keys = (
        "max_abs_logit_diff",
        "tolerance",
        "mcqa_reference",
        "mcqa_exported",
        "tokenizer_matches",
        "readback",
    )
    return json.dumps({k: figures[k] for k in keys if k in figures}, default=str)
