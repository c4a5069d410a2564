"""Write a merged Hugging Face model directory as one GGUF file for llama.cpp and Ollama.

A pure-Python subset of llama.cpp's `convert_hf_to_gguf.py` for the two families medtune trains,
Llama and Gemma 3 (text), through the `gguf` package. The conventions that differ from Hugging Face
and silently break a model when missed:

- **Llama q/k rows are permuted.** HF stores rotary pairs as two halves (`rotate_half`); llama.cpp
  rotates interleaved neighbours, so q_proj / k_proj rows are reordered per head (`permute_qk`).
- **Gemma norms are stored as 1 + w.** HF's Gemma RMSNorm multiplies by `1 + weight`; llama.cpp's
  multiplies by the stored value, so every `*norm.weight` gets +1 (llama.cpp's Gemma3Model does this).
- **Gemma 3's attention layout is not in the file.** llama.cpp hard-codes one global layer in six,
  a local rope base of 10000 and a query scale of 1/sqrt(head_dim); a model that differs is refused
  instead of exported wrong.

Norms and other 1-D tensors stay float32 (llama.cpp does the same); 2-D weights become f16, bf16 or
Q8_0. The tokenizer goes in as metadata: byte-level BPE (Llama 3 style) as `gpt2`, SentencePiece-style
BPE with byte fallback (Gemma) as `llama`, with merges, special ids and the chat template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.errors import ModelError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED_MODEL_TYPES = {"llama": "LLAMA", "gemma3_text": "GEMMA3", "gemma3": "GEMMA3"}
# llama.cpp's Gemma 3 graph: every sixth layer global, local rope base 10000 (llama-model.cpp).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


# ----------------------------------------------------------------------------- weights


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """Reorder q/k rows from HF's half-split rotary layout to llama.cpp's interleaved one.

    Same arithmetic as `LlamaModel.permute` in convert_hf_to_gguf.py; transformers' GGUF loader
    applies the inverse, which is what the export verification relies on.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_tensors(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF state dict -> {gguf name: float32 array} with llama.cpp's value conventions applied."""
    import gguf

    arch = model_arch(config)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), config["num_hidden_layers"])
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in state.items():
        name = _strip_prefix(hf_name)
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd, as convert_hf_to_gguf does
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(
                f"{hf_name}: no GGUF tensor name for this weight ({arch}); cannot export to GGUF"
            )
        out[gguf_name] = _convert_value(name, tensor.float(), config, arch).numpy()
    if arch == "LLAMA" and (freqs := llama3_rope_factors(config)) is not None:
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = freqs
    return out


def _strip_prefix(name: str) -> str:
    """Gemma 3 multimodal checkpoints nest the text model; GGUF holds the text model only."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name.replace("language_model.lm_head.", "lm_head.")


def _convert_value(name: str, tensor: torch.Tensor, config: dict[str, Any], arch: str) -> torch.Tensor:
    if arch == "LLAMA":
        heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
        if name.endswith("q_proj.weight"):
            return permute_qk(tensor, heads, heads)
        if name.endswith("k_proj.weight"):
            return permute_qk(tensor, heads, kv_heads)
    if arch == "GEMMA3" and name.endswith("norm.weight"):
        return tensor + 1  # HF Gemma RMSNorm scales by (1 + w); llama.cpp by w
    return tensor


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """The `rope_freqs` tensor llama.cpp needs for Llama 3.1+ `llama3` rope scaling (else None)."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def encode_tensor(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors and odd shapes stay float32."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if array.ndim < 2 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "f16":
        return array.astype(np.float16), None
    target = qt.BF16 if gguf_type == "bf16" else qt.Q8_0
    try:
        return gguf.quants.quantize(array.astype(np.float32), target), target
    except gguf.quants.QuantError:
        return array.astype(np.float16), None  # row length not a multiple of the block size


# ----------------------------------------------------------------------------- metadata


def model_arch(config: dict[str, Any]) -> str:
    """`LLAMA` or `GEMMA3` (gguf.MODEL_ARCH member names); ModelError for anything else."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"GGUF export supports Llama and Gemma 3 text models, not model_type {model_type!r}; "
            "export `merged` and convert with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (Gemma 3 multimodal nests it under text_config)."""
    if "text_config" in config:
        return {
            **config["text_config"],
            "model_type": "gemma3_text",
            "tie_word_embeddings": config.get("tie_word_embeddings", True),
        }
    return config


def rope_parameters(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """Rope settings from a transformers 5 (`rope_parameters`) or 4 (`rope_theta`/`rope_scaling`) config."""
    params = config.get("rope_parameters")
    if params and layer_type and layer_type in params:
        return params[layer_type]
    if params and "rope_theta" in params:
        return params
    legacy = dict(config.get("rope_scaling") or {})
    legacy.setdefault("rope_type", legacy.pop("type", "default"))
    theta_key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
    legacy["rope_theta"] = config.get(theta_key, 10000.0)
    return legacy


def check_gemma3_layout(config: dict[str, Any]) -> None:
    """Refuse a Gemma 3 variant whose attention layout llama.cpp would silently get wrong."""
    n = config["num_hidden_layers"]
    expected = [
        "full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(n)
    ]
    problems = []
    if config.get("layer_types") and config["layer_types"] != expected:
        problems.append(f"layer_types is not one global layer in {GEMMA3_SWA_PATTERN}")
    local = rope_parameters(config, "sliding_attention")
    if local.get("rope_theta") != GEMMA3_LOCAL_ROPE_BASE or local.get("rope_type", "default") != "default":
        problems.append("the local (sliding) rope is not plain rope with base 10000")
    head_dim = config.get("head_dim", 256)
    scale = config.get("query_pre_attn_scalar", head_dim)
    if scale not in (head_dim, config["hidden_size"] // config["num_attention_heads"]):
        problems.append(f"query_pre_attn_scalar {scale} is neither head_dim nor hidden/heads")
    if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
        problems.append("logit soft-capping is set (Gemma 3 has none)")
    if problems:
        raise ModelError(
            "this Gemma 3 variant cannot be expressed in GGUF, because llama.cpp hard-codes Gemma 3's "
            f"layout: {'; '.join(problems)}"
        )


def write_hparams(writer: Any, config: dict[str, Any], arch: str, name: str) -> None:
    """Hyper-parameters under llama.cpp's keys (the subset its llama / gemma3 loaders read)."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 8192))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    layer_type = "full_attention" if arch == "GEMMA3" else None
    rope = rope_parameters(config, layer_type)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "LLAMA":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_sliding_window(config["sliding_window"])
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in ("default", "llama3"):
        raise ModelError(f"rope type {rope_type!r} is not supported by medtune's GGUF export")


def write_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> str:
    """Vocabulary, merges, special ids and chat template; returns the GGUF tokenizer model name."""
    import gguf

    tok_json = model_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise ModelError(f"{tok_json}: missing; GGUF export needs the fast tokenizer file")
    spec = json.loads(tok_json.read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE":
        raise ModelError(f"{tok_json}: {spec['model']['type']} tokenizers are not supported for GGUF export")
    if spec["model"].get("byte_fallback"):
        tokens, scores, types = _sentencepiece_vocab(model_dir, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)
        kind = "llama"
    else:
        tokens, types = _byte_level_vocab(spec, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(byte_level_pre(spec))
        kind = "gpt2"
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return kind


def _byte_level_vocab(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (GPT-2 byte alphabet spelling, as llama.cpp expects) and their types."""
    import gguf

    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # the model's embedding is larger than the tokenizer: llama.cpp's convert pads the same way
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def _sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    entries = list(gguf.vocab.LlamaHfVocab(model_dir).all_tokens())
    for i in range(len(entries), vocab_size):
        entries.append((f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED))
    return [e[0] for e in entries], [float(e[1]) for e in entries], [int(e[2]) for e in entries]


def byte_level_pre(spec: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name: GPT-2's regex, Llama 3's split regex, or `default`."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for step in pre.get("pretokenizers", []):
        regex = (step.get("pattern") or {}).get("Regex", "")
        if step.get("type") == "Split" and regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)"):
            return "llama-bpe"
    return "default"


# ----------------------------------------------------------------------------- entry point


def write_gguf(
    model_dir: Path, out_path: Path, gguf_type: str = "f16", name: str | None = None
) -> dict[str, Any]:
    """Convert the merged model in `model_dir` to `out_path`; return what was written, for export.json.

    `model_dir` must hold full-precision safetensors (a merged export), not a 4-bit checkpoint.
    """
    import gguf
    from safetensors.torch import load_file

    if gguf_type not in GGUF_TYPES:
        raise ModelError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    config = text_config(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    arch = model_arch(config)
    if arch == "GEMMA3":
        check_gemma3_layout(config)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    tensors = gguf_tensors(state, config)
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    write_hparams(writer, config, arch, name or model_dir.name)
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_kind = write_tokenizer(writer, model_dir, config["vocab_size"])
    stored: dict[str, str] = {}
    for gguf_name, array in tensors.items():
        data, raw_dtype = encode_tensor(array, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        stored[gguf_name] = (
            raw_dtype.name if raw_dtype is not None else str(data.dtype).upper().replace("FLOAT", "F")
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "architecture": arch.lower(),
        "tokenizer": tokenizer_kind,
        "tensors": len(stored),
        "types": stored,
    }


def _file_type(gguf_type: str) -> int:
    import gguf

    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[
        gguf_type
    ]


def read_back(path: Path) -> dict[str, np.ndarray]:
    """Every tensor in a GGUF file, dequantised to float32 in PyTorch shape order (rows first)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = np.asarray(values, dtype=np.float32).reshape(
            tuple(reversed(tensor.shape.tolist()))
        )
    return out


# ----------------------------------------------------------------------------- Ollama


def ollama_modelfile(gguf_name: str, arch: str, stop: list[str]) -> str:
    """A Modelfile whose TEMPLATE is the family's chat format written as a Go template.

    Ollama does not run Jinja; the template below is the plain single-system, multi-turn form of the
    model's own chat template (Llama 3 headers or Gemma turns), which is what medtune trains with.
    """
    if arch == "gemma3":
        template = (
            "{{- range .Messages }}<start_of_turn>"
            '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
            "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
        )
    else:
        template = (
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
            "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    lines += ["PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
