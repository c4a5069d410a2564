"""Loading local models for QLoRA training and inference: every quantisation mode, the Gemma 3
multimodal special case, and refusal of unsafe or broken model directories."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from medtune.config import RunConfig, validate_config
from medtune.errors import ModelError
from medtune.model.load import (
    bnb_config,
    compute_dtype,
    count_parameters,
    load_model_for_inference,
    load_model_for_training,
    load_tokenizer,
)
from medtune.model.measure import model_bytes, peak_training_memory
from tests.conftest import tiny_dims

MODES = ["none", "nf4", "fp4", "int8"]


def make_cfg(model_dir: Path, **sections: dict) -> RunConfig:
    raw = {"model": {"path": str(model_dir)}, "data": {"train": [{"path": "unused.jsonl"}]}, **sections}
    return validate_config(raw)


def train_step(model, vocab: int = 500) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss


@pytest.fixture(scope="module")
def tiny_gemma_mm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Gemma 3 image-text checkpoint (tiny text + tiny SigLIP tower), saved like MedGemma."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from medtune.model.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tiny-gemma-mm")
    config = Gemma3Config(
        text_config=dict(
            **tiny_dims(vocab=600),
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        image_token_index=590,
        boi_token_index=591,
        eoi_token_index=592,
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    train_tokenizer("gemma3", vocab_size=512).save_pretrained(out)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_llama_every_quant_mode_trains_only_the_adapter(tiny_llama_dir: Path, mode: str) -> None:
    model = load_model_for_training(make_cfg(tiny_llama_dir, quantization={"mode": mode}))
    loss = train_step(model)
    assert torch.isfinite(loss)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad, "every trainable parameter, and only those, gets a gradient"
    assert all("lora_" in n for n in with_grad)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.training and model.config.use_cache is False
    linear = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    expected = {"none": "Linear", "nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[mode]
    assert type(linear).__name__ == expected


def test_nf4_shrinks_linear_weights_and_counts_logical_params(tiny_llama_dir: Path) -> None:
    plain = load_model_for_training(make_cfg(tiny_llama_dir, quantization={"mode": "none"}))
    nf4 = load_model_for_training(make_cfg(tiny_llama_dir, quantization={"mode": "nf4"}))
    assert count_parameters(plain) == count_parameters(nf4), "packed 4-bit weights count their real size"
    b_plain, b_nf4 = model_bytes(plain), model_bytes(nf4)
    linear_params = sum(p.numel() for n, p in plain.named_parameters() if "proj.base_layer" in n)
    assert b_nf4["quantized_weights"] == linear_params // 2
    assert 0 < b_nf4["quant_state"] < linear_params
    assert b_nf4["adapter"] == b_plain["adapter"] > 0


def test_quant_storage_follows_fsdp(tiny_llama_dir: Path) -> None:
    cfg = make_cfg(tiny_llama_dir)
    assert bnb_config(cfg.quantization, torch.bfloat16, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(cfg.quantization, torch.bfloat16, fsdp=False).bnb_4bit_quant_storage == torch.uint8
    model = load_model_for_training(cfg, fsdp=True)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    # The compute dtype is bf16 or fp32 on CPU depending on the chip (model.dtype: auto).
    dtype = compute_dtype(cfg.model, torch.device("cpu"))
    assert frozen == {dtype}, "FSDP2 needs one dtype across the frozen weights: the compute dtype"
    assert torch.isfinite(train_step(model))


def test_gradient_checkpointing_every_k_and_same_gradients(tiny_llama_dir: Path) -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = make_cfg(
            tiny_llama_dir,
            quantization={"mode": "none"},
            lora={"dropout": 0.0},
            train={"gradient_checkpointing": ckpt, "checkpoint_every_k_layers": 2},
        )
        model = load_model_for_training(cfg)
        layers = model.base_model.model.model.layers
        assert [layer.gradient_checkpointing for layer in layers] == (
            [True, False] if ckpt else [False, False]
        )
        for name, param in model.named_parameters():  # fresh LoRA B is zero: make gradients non-trivial
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(1))
        train_step(model)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_lora_options_rslora_dora_modules_to_save(tiny_llama_dir: Path) -> None:
    # fp32 pinned: with a bf16 compute dtype (auto on CPUs with amx_bf16/avx512_bf16, and on CUDA) an
    # fp32 modules_to_save lm_head receives bf16 hidden states and F.linear refuses the mix; see
    # tests/test_dtype.py::test_modules_to_save_lm_head_trains_in_bf16 (xfail until fixed).
    cfg = make_cfg(
        tiny_llama_dir,
        model={"path": str(tiny_llama_dir), "dtype": "float32"},
        lora={
            "use_rslora": True,
            "use_dora": True,
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["lm_head"],
            "r": 4,
            "alpha": 8,
        },
    )
    model = load_model_for_training(cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names), "DoRA adds a magnitude vector"
    assert any("modules_to_save" in n and "lm_head" in n for n in names)
    assert not any("k_proj" in n or "mlp" in n for n in names)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5), "rsLoRA scales by alpha / sqrt(r)"
    train_step(model)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_gemma3_text_trains(tiny_gemma_dir: Path, mode: str) -> None:
    model = load_model_for_training(make_cfg(tiny_gemma_dir, quantization={"mode": mode}))
    assert torch.isfinite(train_step(model))
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)


def test_gemma3_multimodal_loads_language_model_only(tiny_gemma_mm_dir: Path, caplog) -> None:
    from transformers import Gemma3ForConditionalGeneration

    # fp32 pinned: compared to an fp32 reference to 1e-5, which a bf16 load (auto on some CPUs) cannot meet.
    fp32 = {"path": str(tiny_gemma_mm_dir), "dtype": "float32"}
    with caplog.at_level(logging.WARNING, logger="medtune.model.load"):
        model, _ = load_model_for_inference(
            make_cfg(tiny_gemma_mm_dir, model=fp32, quantization={"mode": "none"})
        )
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert "language model" in caplog.text
    assert not any("vision" in n or "multi_modal" in n for n, _ in model.named_parameters())
    reference = Gemma3ForConditionalGeneration.from_pretrained(tiny_gemma_mm_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_gemma3_multimodal_trains_quantised(tiny_gemma_mm_dir: Path, mode: str) -> None:
    model = load_model_for_training(make_cfg(tiny_gemma_mm_dir, quantization={"mode": mode}))
    assert torch.isfinite(train_step(model))
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_inference_with_saved_adapter_and_merge(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # fp32 pinned: merged and unmerged logits must agree to 1e-4, tighter than bf16 rounding.
    fp32 = {"path": str(tiny_llama_dir), "dtype": "float32"}
    cfg = make_cfg(tiny_llama_dir, model=fp32, quantization={"mode": "none"})
    trained = load_model_for_training(cfg)
    for name, param in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    for merge in (False, True):
        model, tokenizer = load_model_for_inference(cfg, tmp_path / "adapter", merge=merge)
        assert not model.training and tokenizer.pad_token is not None
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_model_for_inference(cfg, tmp_path)


def test_peak_memory_tracks_a_known_allocation() -> None:
    def step() -> None:
        a = torch.ones(1000, 1000)
        b = a * 2
        del a
        _ = b + 1

    result = peak_training_memory(step, torch.device("cpu"))
    assert result["peak_delta_bytes"] == 3 * 4_000_000 - 4_000_000, "a freed before b + 1 is allocated"
    assert result["retained_bytes"] == 0


# ----------------------------------------------------------------------------- refusals


def test_missing_dir_and_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model_for_training(make_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model_for_training(make_cfg(tmp_path / "empty"))
    with pytest.raises(ModelError, match="config.json"):
        load_tokenizer(make_cfg(tmp_path / "empty").model)


def copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_pickle_only_dir_refused_unless_allowed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    d = copy_config(tiny_llama_dir, tmp_path / "pickle")
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle") as err:
        load_model_for_training(make_cfg(d))
    assert str(d) in str(err.value) and "allow_pickle" in str(err.value)
    model = load_model_for_training(
        make_cfg(d, model={"path": str(d), "allow_pickle": True}, quantization={"mode": "none"})
    )
    assert torch.isfinite(train_step(model))


def test_corrupt_and_missing_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = copy_config(tiny_llama_dir, tmp_path / "truncated")
    blob = (tiny_llama_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelError, match="corrupt") as err:
        load_model_for_training(make_cfg(d))
    assert "model.safetensors" in str(err.value)
    garbage = copy_config(tiny_llama_dir, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="corrupt"):
        load_model_for_training(make_cfg(garbage))
    empty = copy_config(tiny_llama_dir, tmp_path / "noweights")
    with pytest.raises(ModelError, match="no weight files"):
        load_model_for_training(make_cfg(empty))


def test_checkpoint_not_matching_config_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import json

    d = tmp_path / "deeper"
    d.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights only have 2 layers: layer 2 would be random
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="missing"):
        load_model_for_training(make_cfg(d))


def test_unknown_architecture(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import json

    d = tmp_path / "alien"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch", "architectures": ["Alien"]}))
    (d / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="alien"):
        load_model_for_training(make_cfg(d))


CUSTOM_CODE_CONFIGS = {
    "auto-map": {
        "model_type": "mycustom",
        "architectures": ["MyModel"],
        "auto_map": {
            "AutoConfig": "configuration_my.MyConfig",
            "AutoModelForCausalLM": "modeling_my.MyModel",
        },
    },
    "unknown-type": {"model_type": "not-a-real-arch", "architectures": ["Alien"]},
}


@pytest.mark.parametrize("kind", CUSTOM_CODE_CONFIGS)
def test_custom_code_model_names_the_config_key(tiny_llama_dir: Path, tmp_path: Path, kind: str) -> None:
    """transformers' own advice (`trust_remote_code=True`, a hub link) means nothing to a config user."""
    import json

    d = tmp_path / kind
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CUSTOM_CODE_CONFIGS[kind]))
    (d / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    for load in (lambda: load_model_for_training(make_cfg(d)), lambda: load_tokenizer(make_cfg(d).model)):
        with pytest.raises(ModelError, match=r"model\.trust_remote_code") as err:
            load()
        message = str(err.value)
        assert str(d) in message and "runs Python code from" in message
        assert "hf.co" not in message and "trust_remote_code=True" not in message
