"""Load a local causal LM for QLoRA training or for inference, from a model directory only.

One path for every architecture transformers knows: validate the directory (safetensors only unless
the config allows pickle), pick the compute dtype, build the bitsandbytes config, load, then wrap in
LoRA. The single special case is a Gemma 3 *multimodal* checkpoint (MedGemma 4B): for text
fine-tuning only its language model is loaded, as a `Gemma3ForCausalLM`, so the vision tower never
takes memory.

What we deliberately do not copy from `peft.prepare_model_for_kbit_training`: it casts every bf16/fp16
parameter that is not 4-bit (embeddings, norms, lm_head) to fp32. Those weights are frozen, so fp32
buys nothing but memory (Gemma 3's 262k x 2560 embedding alone grows by 1.3 GB) and, under FSDP2,
breaks the one-dtype-per-shard rule. We keep frozen weights in their storage dtype and put only the
*trainable* parameters (LoRA, modules_to_save) in fp32, where the optimiser needs the precision.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from medtune.config import LoraConfig, ModelConfig, QuantizationConfig, RunConfig
from medtune.errors import ModelError
from medtune.model.cpu_caps import cpu_bf16_choice

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Gemma 3 multimodal checkpoints store the text model under one of these prefixes: the original hub
# layout (`language_model.model.*`, also what transformers 5 writes back) and the transformers 5
# in-memory layout (`model.language_model.*`). Both map onto Gemma3ForCausalLM's `model.*` / `lm_head`.
GEMMA3_TEXT_KEY_MAPPING = {
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^model\.language_model\.": "model.",
}


# ----------------------------------------------------------------------------- directory checks


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The directory's `config.json` as a dict; ModelError if the folder or the file is missing or bad."""
    if not model_dir.is_dir():
        raise ModelError(f"model directory not found: {model_dir} (model.path must be a local folder)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing; a model directory needs config.json next to its weights")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: not valid JSON: {exc}") from None


def refuse_custom_code(model_cfg: ModelConfig, config: dict[str, Any]) -> None:
    """ModelError naming `model.trust_remote_code` for a model that needs code from its own folder.

    transformers would say "pass trust_remote_code=True" and link the local path as a hub repo,
    advice a config user cannot follow; we name the key and what turning it on means.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_cfg.trust_remote_code:
        return
    model_dir = Path(model_cfg.path)
    consequence = (
        f"set model.trust_remote_code: true only if you trust that folder: it runs Python code from "
        f"{model_dir} with your rights"
    )
    if "auto_map" in config:
        raise ModelError(
            f"{model_dir}: the model ships its own code (`auto_map` in config.json); {consequence}"
        )
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelError(
            f"{model_dir}: model_type {model_type!r} in config.json is not one this transformers knows; "
            f"a newer transformers may know it, or, if the folder holds its own modelling code, {consequence}"
        )


def check_weights(model_cfg: ModelConfig) -> bool:
    """Validate the weight files and return True when they are safetensors (False: allowed pickle).

    Safetensors headers are opened (cheap: no tensor data is read) so a truncated download fails
    here with the file named, not deep inside from_pretrained.
    """
    model_dir = Path(model_cfg.path)
    safetensors = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if safetensors:
        for path in safetensors:
            _check_safetensors_file(path)
        return True
    if not pickles:
        raise ModelError(f"{model_dir}: no weight files (*.safetensors) found")
    if not model_cfg.allow_pickle:
        names = ", ".join(p.name for p in pickles[:3])
        raise ModelError(
            f"{model_dir}: only pickle weights ({names}); pickle files can run arbitrary code when loaded, "
            'so medtune refuses them. Convert once with `python -c "from transformers import '
            "AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('DIR-st')\"` in a sandbox, "
            "or set model.allow_pickle: true if you trust the source."
        )
    log.warning("%s: loading pickle weights because model.allow_pickle is true", model_dir)
    return False


def _check_safetensors_file(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"{path}: corrupt or truncated safetensors file ({exc}); re-download or re-export it"
        ) from None


def is_gemma3_multimodal(config: dict[str, Any]) -> bool:
    """A Gemma 3 image-text checkpoint (MedGemma 4B, Gemma 3 4B+): we train its language model only."""
    return config.get("model_type") == "gemma3" and "text_config" in config


# ----------------------------------------------------------------------------- dtype and quantisation


def _announce(message: str) -> None:
    """Print once per job: under torchrun every rank loads the model, only global rank 0 says so."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def default_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def compute_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The compute dtype `load_base_model` uses (see `resolve_compute_dtype` for the rule)."""
    return resolve_compute_dtype(model_cfg, device)[0]


def resolve_compute_dtype(model_cfg: ModelConfig, device: torch.device) -> tuple[torch.dtype, str]:
    """(dtype, why). auto: bf16 where the chip computes it natively, else fp32.

    On a CPU without amx_bf16/avx512_bf16, bf16 matmuls are emulated and slower than fp32, so auto
    keeps fp32 there (`medtune.model.cpu_caps` holds the rule and its measurements). GPUs before
    Ampere (compute capability < 8.0: V100, T4, still common in hospitals) have no bf16 units either;
    fp16 would need loss scaling, which medtune's loop does not do, so auto is fp32 there too.
    """
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype), "set by model.dtype"
    if device.type == "cuda":
        use_bf16, reason = gpu_bf16_choice(device)
        where = "CUDA"
    else:
        use_bf16, reason = cpu_bf16_choice()
        where = device.type
    return (torch.bfloat16 if use_bf16 else torch.float32), f"auto on {where}: {reason}"


def gpu_bf16_choice(device: torch.device) -> tuple[bool, str]:
    """(has bf16 units, why): compute capability 8.0 (Ampere) and later; the GPU twin of
    `cpu_caps.cpu_bf16_choice`, shared by training and `medtune chat`."""
    major, minor = torch.cuda.get_device_capability(device)
    has = major >= 8
    return has, f"compute capability {major}.{minor} has {'bf16' if has else 'no native bf16'}"


def quant_storage_dtype(quant_cfg: QuantizationConfig, dtype: torch.dtype, fsdp: bool) -> torch.dtype:
    """Storage dtype of packed 4-bit weights: FSDP2 shards need one dtype, so they share the compute dtype."""
    if quant_cfg.quant_storage == "auto":
        return dtype if fsdp else torch.uint8
    return getattr(torch, quant_cfg.quant_storage)


def bnb_config(quant_cfg: QuantizationConfig, dtype: torch.dtype, fsdp: bool = False):
    """A transformers BitsAndBytesConfig for the chosen mode, or None when not quantising."""
    from transformers import BitsAndBytesConfig

    if quant_cfg.mode == "none":
        return None
    if quant_cfg.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.mode,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_quant_storage=quant_storage_dtype(quant_cfg, dtype, fsdp),
    )


# ----------------------------------------------------------------------------- loading


def load_tokenizer(model_cfg: ModelConfig):
    """The directory's tokenizer; a missing pad token becomes EOS (logged), which padded batches need."""
    from transformers import AutoTokenizer

    model_dir = Path(model_cfg.path)
    refuse_custom_code(model_cfg, read_model_config(model_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=model_cfg.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load the tokenizer: {exc}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        log.info("%s: tokenizer has no pad token; using EOS %r for padding", model_dir, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: RunConfig, device: torch.device, fsdp: bool = False):
    """The quantised (or plain) causal LM, on `device`, every parameter frozen in its storage dtype."""
    model_dir = Path(cfg.model.path)
    raw_config = read_model_config(model_dir)
    refuse_custom_code(cfg.model, raw_config)
    use_safetensors = check_weights(cfg.model)
    dtype, why = resolve_compute_dtype(cfg.model, device)
    _announce(f"model: compute dtype {str(dtype).removeprefix('torch.')} ({why})")
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        quantization_config=bnb_config(cfg.quantization, dtype, fsdp),
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=use_safetensors,
        local_files_only=True,
        device_map={"": device},
        output_loading_info=True,
    )
    try:
        model, info = _from_pretrained(model_dir, raw_config, kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{model_dir}: cannot load model ({type(exc).__name__}: {exc})") from None
    _refuse_missing_weights(model_dir, model, info)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _from_pretrained(model_dir: Path, raw_config: dict[str, Any], kwargs: dict[str, Any]):
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    if not is_gemma3_multimodal(raw_config):
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    text_config = Gemma3TextConfig(**raw_config["text_config"])
    log.warning(
        "%s: Gemma 3 multimodal checkpoint (%s); loading only its language model as Gemma3ForCausalLM "
        "for text fine-tuning (the vision tower and projector are not loaded)",
        model_dir,
        ",".join(raw_config.get("architectures") or ["?"]),
    )
    return Gemma3ForCausalLM.from_pretrained(
        model_dir, config=text_config, key_mapping=GEMMA3_TEXT_KEY_MAPPING, **kwargs
    )


def _refuse_missing_weights(model_dir: Path, model, info: dict[str, Any]) -> None:
    """Missing weights would be silently random-initialised: a wrong checkpoint must fail instead."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ModelError(
            f"{model_dir}: {len(missing)} weight(s) missing from the checkpoint (e.g. {shown}); "
            "the folder does not match its config.json"
        )


def lora_config(lora_cfg: LoraConfig):
    """A peft LoraConfig for causal-LM training from our section (all-linear skips lm_head)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        use_rslora=lora_cfg.use_rslora,
        use_dora=lora_cfg.use_dora,
        modules_to_save=lora_cfg.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model_for_training(cfg: RunConfig, fsdp: bool = False, device: torch.device | None = None):
    """Base model (quantised per `cfg.quantization`) + fresh LoRA adapter, ready for a training loop.

    Frozen weights stay in their storage dtype; trainable parameters are fp32. The model is returned
    in train mode: in eval mode bitsandbytes may repack 4-bit weights in place on CPUs with
    avx512_bf16, which corrupts FSDP2 shards.
    """
    from peft import get_peft_model

    device = device or default_device()
    model = load_base_model(cfg, device, fsdp)
    model.config.use_cache = False  # a KV cache is useless in training and breaks packed-sequence isolation
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False},
            every_n_layers=cfg.train.checkpoint_every_k_layers,
            offload=cfg.train.activation_offload,
        )
    try:
        model = get_peft_model(model, lora_config(cfg.lora), autocast_adapter_dtype=True)
    except ValueError as exc:
        raise ModelError(f"{cfg.model.path}: cannot apply LoRA ({exc}); check lora.target_modules") from None
    _trainable_to_fp32(model)
    model.train()
    trainable, total = count_parameters(model)
    share = 100 * trainable / total
    _announce(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")
    return model


def _trainable_to_fp32(model: torch.nn.Module) -> None:
    """Optimiser master weights in fp32; peft already does this for LoRA, not for modules_to_save.

    A module whose own weights this upcasts (a `modules_to_save` lm_head or embedding) still sits
    in a bf16 network: hooks run it in fp32 and hand its output on in the dtype it had, else
    F.linear refuses bf16 hidden states against an fp32 weight.
    """
    for module in model.modules():
        upcast = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        if not upcast:
            continue
        compute_dtype = upcast[0].dtype
        for param in upcast:
            param.data = param.data.float()
        module.register_forward_pre_hook(lambda _m, args: _cast_floats(args, torch.float32))
        module.register_forward_hook(lambda _m, _args, out, dtype=compute_dtype: _cast_floats(out, dtype))


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating tensor in it (a tensor, or a tuple of them) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    return value


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit tensor counts its real element count.

    bitsandbytes stores two 4-bit values per uint8 byte, so `numel()` of a Params4bit is half the
    logical count (or less, with a wider quant_storage); its quant_state keeps the true shape.
    """
    trainable = total = 0
    for param in model.parameters():
        n = logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def logical_numel(param: torch.Tensor) -> int:
    """Elements the parameter represents (the unpacked shape for bitsandbytes 4-bit weights)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def load_model_for_inference(cfg: RunConfig, adapter_dir: Path | None = None, merge: bool = False):
    """(model, tokenizer) in eval mode with the KV cache on; optionally a trained adapter on top.

    `merge` folds the adapter into the base weights for faster generation; on a quantised base this
    dequantises, adds and re-quantises, so outputs shift slightly (peft warns).
    """
    device = default_device()
    model = load_base_model(cfg, device, fsdp=False)
    if adapter_dir is not None:
        model = _attach_adapter(model, Path(adapter_dir), merge)
    model.config.use_cache = True
    model.eval()
    return model, load_tokenizer(cfg.model)


def _attach_adapter(model, adapter_dir: Path, merge: bool):
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelError(
            f"{adapter_dir}: cannot load adapter onto {model.config.model_type}: {exc}"
        ) from None
    return model.merge_and_unload() if merge else model
