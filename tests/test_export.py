"""Exports reload and match base + adapter: merged (HF), adapter-only (peft) and GGUF (llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medtune.config import RunConfig
from medtune.errors import ConfigError, ModelError, RunDirError
from medtune.export import read_run, run_export
from medtune.model.gguf_export import permute_qk, read_back
from medtune.model.probe import PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(tmp: Path, model_dir: Path, seed: int = 0) -> Path:
    """A fake finished run: train/adapter (LoRA with non-zero B, so merging matters) + train/run.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp / "run"
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(run / "train" / "adapter")
    cfg = RunConfig.model_validate(
        {"model": {"path": str(model_dir)}, "data": {"eval": [{"path": "x.jsonl"}]}}
    )
    (run / "train" / "run.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    return run


@torch.no_grad()
def logits_of(model_dir: Path, adapter: Path | None = None, tokenizer_dir: Path | None = None, **kwargs):
    """Last-prompt (Korean) logits of a model directory, optionally with a peft adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()(tok(PROMPTS[1], return_tensors="pt").input_ids).logits[0]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("llama-run"), tiny_llama_dir)


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("gemma-run"), tiny_gemma_dir)


# -------------------------------------------------------------------------------- merged


@pytest.mark.parametrize(("run_name", "dtype"), [("llama_run", "float32"), ("gemma_run", "bfloat16")])
def test_merged_export_reloads_and_matches_base_plus_adapter(run_name, dtype, request, tmp_path):
    run = request.getfixturevalue(run_name)
    cfg, adapter = read_run(run)
    out = run_export(run, "merged", tmp_path / "merged", dtype=dtype)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= names
    assert "adapter_config.json" not in names and not list(out.glob("*.bin"))
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (
        out / "tokenizer_config.json"
    ).read_text()
    report = json.loads((out / "export.json").read_text())["verification"]
    assert report["passed"] and report["mcqa_exported"] == report["mcqa_reference"]
    exported = logits_of(out)  # plain transformers, no peft: the adapter is inside the weights
    expected = logits_of(cfg.model.path, adapter)
    base_only = logits_of(cfg.model.path)
    diff = (exported - expected).abs().max().item()
    assert diff <= (1e-4 if dtype == "float32" else 0.05 * expected.abs().max().item())
    assert (base_only - expected).abs().max().item() > 20 * max(diff, 1e-5)  # the merge did something
    if dtype == "bfloat16":
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_replaces_a_previous_export_but_never_a_foreign_folder(llama_run, tmp_path):
    out = run_export(llama_run, "peft", tmp_path / "x")
    (out / "stale.txt").write_text("old")
    run_export(llama_run, "peft", out)
    assert not (out / "stale.txt").exists()
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a medtune export"):
        run_export(llama_run, "peft", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_default_out_is_inside_the_run(llama_run):
    """`medtune export RUN --format peft` with no --out writes RUN/export/peft, as the help says."""
    from medtune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", str(llama_run), "--format", "peft"])
    assert exit_.value.code == 0
    report = json.loads((llama_run / "export" / "peft" / "export.json").read_text())
    assert report["format"] == "peft" and report["verification"]["passed"]


def test_export_never_writes_over_the_run_or_what_it_reads(llama_run):
    cfg, adapter = read_run(llama_run)
    for out in (llama_run, llama_run.parent):
        with pytest.raises(RunDirError, match="must not be the run directory or contain it"):
            run_export(llama_run, "peft", out)
    for out in (llama_run / "train", adapter, adapter / "new", cfg.model.path / "x"):
        with pytest.raises(RunDirError, match="which the export reads"):
            run_export(llama_run, "peft", out)
    assert not (adapter / "new").exists() and not (cfg.model.path / "x").exists()
    assert (adapter / "adapter_config.json").is_file() and (llama_run / "train" / "run.json").is_file()


# -------------------------------------------------------------------------------- peft


def test_peft_export_reloads_with_peft_and_pins_the_base(gemma_run, tmp_path):
    from medtune.export import base_identity

    cfg, adapter = read_run(gemma_run)
    out = run_export(gemma_run, "peft", tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    report = json.loads((out / "export.json").read_text())["verification"]
    assert report["passed"] and report["max_abs_logit_diff"] == 0.0
    readme = (out / "README.md").read_text()
    identity = base_identity(Path(cfg.model.path))
    assert identity["weights_sha256"] in readme and identity["config_sha256"] in readme
    assert str(cfg.model.path) in readme and cfg.config_hash() in readme
    torch.testing.assert_close(logits_of(cfg.model.path, out), logits_of(cfg.model.path, adapter))


# -------------------------------------------------------------------------------- bad inputs


def test_bad_run_directory_names_what_is_missing(tmp_path, llama_run):
    with pytest.raises(RunDirError, match="not found"):
        run_export(tmp_path / "nope", "merged", tmp_path / "o")
    empty = tmp_path / "empty"
    (empty / "train" / "adapter").mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"train[/\\]run\.json"):
        run_export(empty, "merged", tmp_path / "o")
    (empty / "train" / "run.json").write_text((llama_run / "train" / "run.json").read_text())
    with pytest.raises(RunDirError, match="adapter_config.json"):
        run_export(empty, "peft", tmp_path / "o")
    (empty / "train" / "adapter" / "adapter_config.json").write_text("{}")
    (empty / "train" / "run.json").write_text('{"stage": "train"}')
    with pytest.raises(RunDirError, match="config"):
        run_export(empty, "peft", tmp_path / "o")
    with pytest.raises(ConfigError, match="format"):
        run_export(llama_run, "onnx", tmp_path / "o")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gguf-type"):
        run_export(llama_run, "gguf", tmp_path / "o", gguf_type="q4_k")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------- GGUF


def test_permute_qk_matches_llama_cpp_and_transformers_inverts_it():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of head_dim 4
    p = permute_qk(w, 2, 2)
    # per head, rows [0,1,2,3] -> [0,2,1,3]: half-split rotary pairs (0,2),(1,3) become neighbours
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models whose attention is sharp enough that a wrong q/k layout changes the logits a lot.

    The Gemma 3 one has Gemma 3's real layout (one global layer in six, head_dim = query scale), the
    only layout llama.cpp runs, so transformers' GGUF importer and llama.cpp agree on it.
    """
    from medtune.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("gguf-models")
    gemma = dict(
        num_hidden_layers=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        head_dim=256,
        query_pre_attn_scalar=256,
    )
    return {
        "llama": build_tiny_model(root / "llama", "llama", initializer_range=0.2),
        "gemma3": build_tiny_model(root / "gemma3", "gemma3", initializer_range=0.2, **gemma),
    }


@pytest.mark.parametrize(
    ("arch", "gguf_type"),
    [("llama", "f16"), ("gemma3", "f16"), pytest.param("llama", "q8_0", marks=pytest.mark.slow)],
)
def test_gguf_reads_back_and_transformers_load_matches(arch, gguf_type, gguf_models, tmp_path):
    run = make_run(tmp_path, gguf_models[arch])
    cfg, adapter = read_run(run)
    out = run_export(run, "gguf", tmp_path / "gguf", gguf_type=gguf_type)
    report = json.loads((out / "export.json").read_text())["verification"]
    assert report["passed"], report
    assert report["tokenizer_matches"] == {"en": True, "ko": True}
    assert not report["readback"]["missing"] and not report["readback"]["shape_mismatches"]
    tensors = read_back(out / "model.gguf")
    config = json.loads((gguf_models[arch] / "config.json").read_text())
    assert tensors["token_embd.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert ("output.weight" in tensors) == (arch == "llama")  # Gemma ties lm_head to the embedding
    source = load_file(str(gguf_models[arch] / "model.safetensors"))
    offset = 1.0 if arch == "gemma3" else 0.0  # llama.cpp's Gemma norms hold 1 + w
    np.testing.assert_allclose(tensors["output_norm.weight"], source["model.norm.weight"].numpy() + offset)
    # The independent proof: transformers undoes llama.cpp's conventions itself.
    expected = logits_of(cfg.model.path, adapter)
    got = logits_of(out, tokenizer_dir=cfg.model.path, gguf_file="model.gguf")
    rel = (got - expected).abs().max().item() / expected.abs().max().item()
    assert rel < (0.02 if gguf_type == "f16" else 0.1)
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf")
    stop = "<|eot_id|>" if arch == "llama" else "<end_of_turn>"
    assert f'PARAMETER stop "{stop}"' in modelfile and "{{ .Content }}" in modelfile


def test_gguf_without_the_qk_permutation_would_be_caught(gguf_models, tmp_path, monkeypatch):
    """The verification is not vacuous: skipping llama.cpp's q/k layout makes the export fail."""
    import medtune.model.gguf_export as gguf_export

    monkeypatch.setattr(gguf_export, "permute_qk", lambda w, *a: w)
    run = make_run(tmp_path, gguf_models["llama"])
    with pytest.raises(ModelError, match="failed its verification"):
        run_export(run, "gguf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_gguf_refuses_a_gemma3_layout_llama_cpp_cannot_run(gemma_run, tmp_path):
    # the fixture's 2-layer Gemma alternates local/global; llama.cpp hard-codes one global in six
    with pytest.raises(ModelError, match="one global layer in 6"):
        run_export(gemma_run, "gguf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def sentencepiece_style_tokenizer():
    """A Gemma-style tokenizer: BPE over `▁`-joined text with <0xNN> byte fallback, no byte-level alphabet."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from medtune.model.tiny import GEMMA_TEMPLATE

    special = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=special + ["<start_of_turn>", "<end_of_turn>"], show_progress=False
    )
    corpus = resources.files("medtune.model").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    bos = ("<bos>", tok.token_to_id("<bos>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[bos]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = GEMMA_TEMPLATE
    return fast


def test_gguf_sentencepiece_style_vocab_round_trips_through_transformers(tmp_path):
    """Real Gemma 3 / MedGemma tokenizers are byte-fallback BPE, written as GGUF `llama` vocab with scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.model.gguf_export import write_gguf
    from medtune.model.tiny import tiny_config

    tokenizer = sentencepiece_style_tokenizer()
    layout = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])
    config = tiny_config("gemma3", len(tokenizer), tokenizer, **layout)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert write_gguf(tmp_path, tmp_path / "m.gguf", "f16")["tokenizer"] == "llama"
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in (*PROMPTS, "  two  spaces, a snowman \u2603 and an emoji \U0001f642"):
        assert from_gguf(text).input_ids == tokenizer(text).input_ids


# -------------------------------------------------------------------------------- forgetting guard


def test_export_refuses_a_model_that_failed_its_guard_unless_forced(tmp_path, tiny_llama_dir):
    from medtune.evaluate.guard import GuardFailed

    run = make_run(tmp_path, tiny_llama_dir)
    (run / "eval").mkdir()
    check = {"group": "language=ko", "metric": "accuracy", "allowed": 2.0, "passed": False, "why": "-12.0 pp"}
    (run / "eval" / "guard.json").write_text(json.dumps({"passed": False, "checks": [check]}))
    with pytest.raises(GuardFailed, match="language=ko|-12.0 pp"):
        run_export(run, "peft", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = run_export(run, "peft", tmp_path / "forced", force=True)
    guard = json.loads((out / "export.json").read_text())["guard"]
    assert guard["status"] == "failed" and guard["forced"] and guard["checks"] == [check]
    (run / "eval" / "guard.json").unlink()
    unchecked = run_export(run, "peft", tmp_path / "unchecked")
    assert json.loads((unchecked / "export.json").read_text())["guard"]["status"] == "not checked"
