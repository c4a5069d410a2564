"""The memory planner: byte formulas checked against bitsandbytes and real loads, and the verdicts it
gives for the public configs in examples/model_configs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medtune.config import validate_config
from medtune.errors import ModelError
from medtune.plan import (
    GIB,
    PlanOptions,
    cheapest_fitting_switches,
    fits,
    max_micro_batch,
    max_seq_len,
    min_gpus,
    model_shape,
    option_savings,
    plan_memory,
    quantized_linear_bytes,
    read_config_json,
    run_plan,
)

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "model_configs"


def config(name: str) -> dict:
    return read_config_json(CONFIGS / name)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("medgemma-4b", 3.880e9),
        ("llama-3.1-8b", 8.030e9),
        ("llama-3.3-70b", 70.554e9),
        ("gemma-3-270m", 0.268e9),
    ],
)
def test_parameter_counts_match_published_sizes(name: str, params: float) -> None:
    assert model_shape(config(name)).total_params() == pytest.approx(params, rel=2e-3)


def test_multimodal_config_plans_the_text_model_only() -> None:
    shape = model_shape(config("medgemma-4b"))
    assert (shape.vocab, shape.layers, shape.hidden, shape.head_dim, shape.kv_heads) == (
        262208,
        34,
        2560,
        256,
        4,
    )
    assert shape.tied and shape.norms_per_layer == 4 and shape.qk_norm


@pytest.mark.parametrize(("double_quant", "low", "high"), [(True, 0.5, 0.53), (False, 0.56, 0.57)])
def test_nf4_bytes_per_quantised_param(double_quant: bool, low: float, high: float) -> None:
    packed, state = quantized_linear_bytes(4096, 14336, "nf4", double_quant)
    assert low <= (packed + state) / (4096 * 14336) <= high


@pytest.mark.parametrize(
    ("quant", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)]
)
def test_quantised_bytes_equal_bitsandbytes_layout(quant: str, double_quant: bool) -> None:
    """Quantise a real weight with bitsandbytes and count every tensor it keeps."""
    from types import SimpleNamespace

    import bitsandbytes.functional as bnbf

    from medtune.model.measure import quant_state_tensors

    n_in, n_out = 320, 200  # not multiples of the block sizes: the ceilings matter
    weight = torch.randn(n_out, n_in)
    if quant == "int8":
        packed_t, scb, _ = bnbf.int8_vectorwise_quant(weight)
        holder = SimpleNamespace(SCB=scb)
    else:
        packed_t, state = bnbf.quantize_4bit(weight, quant_type=quant, compress_statistics=double_quant)
        holder = SimpleNamespace(quant_state=state)
    measured_state = sum(t.untyped_storage().nbytes() for t in quant_state_tensors(holder))
    packed, state_bytes = quantized_linear_bytes(n_in, n_out, quant, double_quant)
    assert packed_t.untyped_storage().nbytes() == packed
    assert measured_state == state_bytes


@pytest.mark.parametrize("mode", ["nf4", "int8", "none"])
def test_static_plan_equals_a_loaded_model(tiny_llama_dir: Path, mode: str) -> None:
    from medtune.model.load import load_model_for_training
    from medtune.model.measure import model_bytes

    cfg = validate_config(
        {
            # Pinned: auto is bf16 on CPUs with native bf16; the plan below is for the same dtype.
            "model": {"path": str(tiny_llama_dir), "dtype": "float32"},
            "data": {"train": [{"path": "x"}]},
            "quantization": {"mode": mode},
        }
    )
    measured = model_bytes(load_model_for_training(cfg))
    opts = PlanOptions(quant=mode, dtype="float32", lora_r=cfg.lora.r)
    c = plan_memory(read_config_json(tiny_llama_dir), opts).components
    assert c["base_quantized"] == measured["quantized_weights"]
    assert c["quant_state"] == measured["quant_state"]
    assert c["base_unquantized"] == measured["frozen_weights"]
    assert c["adapter"] == measured["adapter"]


def test_medgemma_4b_qlora_2048_fits_under_20_gib() -> None:
    plan = plan_memory(config("medgemma-4b"), PlanOptions(seq_len=2048))
    assert plan.total_bytes < 20 * GIB
    assert fits(plan, 24)
    unchunked = plan_memory(config("medgemma-4b"), PlanOptions(seq_len=2048, chunked_ce=False))
    # 262k vocabulary: chunks of 1024 tokens halve the ~6 GiB of fp32 loss tensors at 2048 tokens
    assert unchunked.total_bytes - plan.total_bytes > 2.5 * GIB


def test_70b_needs_fsdp_on_small_cards() -> None:
    cfg, opts = config("llama-3.3-70b"), PlanOptions(seq_len=2048)
    needed = {gb: min_gpus(cfg, opts, gb) for gb in (24, 48, 80)}
    assert needed[80] == 1, "70B NF4 (~35 GiB weights) fits one 80 GiB card"
    assert needed[24] is not None and needed[24] >= 2
    assert needed[24] >= needed[48] >= needed[80]
    n = needed[24]
    assert fits(plan_memory(cfg, replace(opts, gpus=n)), 24)
    assert not fits(plan_memory(cfg, replace(opts, gpus=n - 1)), 24)
    sharded = plan_memory(cfg, replace(opts, gpus=4)).components
    single = plan_memory(cfg, opts).components
    assert sharded["base_quantized"] == pytest.approx(single["base_quantized"] / 4, rel=1e-6)


def test_longest_sequence_and_batch_are_tight() -> None:
    cfg, opts = config("llama-3.1-8b"), PlanOptions(seq_len=2048)
    longest = max_seq_len(cfg, opts, 24)
    assert longest is not None and longest % 128 == 0
    assert fits(plan_memory(cfg, replace(opts, seq_len=longest)), 24)
    assert not fits(plan_memory(cfg, replace(opts, seq_len=longest + 128)), 24)
    batch = max_micro_batch(cfg, opts, 24)
    assert fits(plan_memory(cfg, replace(opts, micro_batch=batch)), 24)
    assert not fits(plan_memory(cfg, replace(opts, micro_batch=batch + 1)), 24)


def test_memory_grows_with_sequence_and_shrinks_with_each_switch() -> None:
    cfg = config("gemma-3-270m")
    base = PlanOptions(seq_len=4096, chunked_ce=False, checkpoint_every_k=None)
    totals = [plan_memory(cfg, replace(base, seq_len=t)).total_bytes for t in (512, 1024, 2048, 4096)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    savings = option_savings(cfg, base)
    assert all(v > 0 for v in savings.values()), savings
    assert savings["chunked_ce"] > savings["optimizer_8bit"], "262k vocab: the logits dominate a 270M model"
    every_2 = plan_memory(cfg, replace(base, checkpoint_every_k=2)).total_bytes
    every_1 = plan_memory(cfg, replace(base, checkpoint_every_k=1)).total_bytes
    assert every_1 < every_2 < plan_memory(cfg, base).total_bytes


def test_cheapest_switches_prefer_free_ones() -> None:
    cfg = config("llama-3.1-8b")
    opts = PlanOptions(seq_len=8192)
    roomy = cheapest_fitting_switches(cfg, replace(opts, seq_len=2048), 80)
    assert roomy is not None and roomy["switches"] == [], (
        "8B at 2048 tokens fits 80 GiB with nothing switched on"
    )
    tight = cheapest_fitting_switches(cfg, opts, 24)
    assert tight is not None and "checkpointing" in tight["switches"]
    assert cheapest_fitting_switches(cfg, opts, 4) is None


def test_run_plan_from_run_config_and_from_a_path(tiny_llama_dir: Path, capsys, tmp_path: Path) -> None:
    cfg = validate_config(
        {
            "model": {"path": str(tiny_llama_dir)},
            "data": {"train": [{"path": "x"}]},
            "packing": {"max_seq_len": 512},
            "train": {"micro_batch_size": 2, "optimizer": "adamw_8bit"},
        }
    )
    result = run_plan(cfg, gpus=1, gpu_memory_gb=8, out_json=tmp_path / "plan.json")
    assert result["options"]["seq_len"] == 512 and result["options"]["micro_batch"] == 2
    assert result["options"]["optimizer"] == "adamw_8bit" and result["fits"]
    assert json.loads((tmp_path / "plan.json").read_text())["total_bytes"] == result["total_bytes"]
    assert "verdict" in capsys.readouterr().out
    by_path = run_plan(
        CONFIGS / "medgemma-4b" / "config.json", gpus=2, gpu_memory_gb=24, seq_len=2048, show=False
    )
    assert by_path["fits"] and by_path["shape"]["vocab"] == 262208 and by_path["gpus"] == 2


def test_missing_config_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        run_plan(tmp_path, show=False)
