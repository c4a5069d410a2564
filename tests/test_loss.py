"""Chunked cross-entropy equals the full-logits reference (loss and every gradient), never builds
full logits, keeps packed documents apart; activation offloading and per-layer checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Gemma2Config

from medtune.config import TrainConfig
from medtune.errors import MedtuneError
from medtune.loss import (
    IGNORE_INDEX,
    chunked_ce_sum,
    fused_ce_available,
    loss_sum,
    resolve_ce_mode,
    token_nll,
)
from tests.conftest import tiny_dims

ATOL = 1e-5
CHUNK = 16  # the config minimum; the batches below have 19-29 targets, so chunks never divide evenly


def tiny_gemma2() -> torch.nn.Module:
    """Gemma 2 with final-logit soft-capping, the architecture that exercises the tanh cap."""
    config = Gemma2Config(
        **tiny_dims(),
        head_dim=16,
        sliding_window=16,
        final_logit_softcapping=30.0,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module", params=["llama", "gemma3", "gemma2"])
def base_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    if request.param == "gemma2":
        return tiny_gemma2()
    model_dir: Path = request.getfixturevalue(f"tiny_{'llama' if request.param == 'llama' else 'gemma'}_dir")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def with_lora(model: torch.nn.Module, **kw: object) -> torch.nn.Module:
    """LoRA all-linear with random B (init_lora_weights=False) so every LoRA grad is non-zero."""
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=kw.pop("target_modules", "all-linear"),
        lora_dropout=0.0,
        init_lora_weights=False,
        **kw,
    )
    return get_peft_model(model, cfg).train()


def shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    """Pre-shifted labels: position t predicts ids[t+1] for answer tokens, -100 for prompt and the last."""
    return [ids[t + 1] if t + 1 >= prompt_len and t + 1 < len(ids) else IGNORE_INDEX for t in range(len(ids))]


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two documents in one row: position_ids restart at 0, no attention_mask."""
    g = torch.Generator().manual_seed(seed)
    a, b = (
        torch.randint(5, vocab, (14,), generator=g).tolist(),
        torch.randint(5, vocab, (18,), generator=g).tolist(),
    )
    labels = shifted_labels(a, 3) + shifted_labels(b, 4)
    return {
        "input_ids": torch.tensor([a + b]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([list(range(len(a))) + list(range(len(b)))]),
        "seq_lens": [[len(a), len(b)]],
    }


def padded_batch(vocab: int, seed: int = 1) -> dict:
    """Two rows, the second right-padded: attention_mask and -100 labels on the padding."""
    g = torch.Generator().manual_seed(seed)
    a, b = (
        torch.randint(5, vocab, (20,), generator=g).tolist(),
        torch.randint(5, vocab, (13,), generator=g).tolist(),
    )
    pad = 20 - len(b)
    return {
        "input_ids": torch.tensor([a, b + [0] * pad]),
        "labels": torch.tensor([shifted_labels(a, 5), shifted_labels(b, 2) + [IGNORE_INDEX] * pad]),
        "position_ids": torch.tensor([list(range(20)), list(range(20))]),
        "attention_mask": torch.tensor([[1] * 20, [1] * len(b) + [0] * pad]),
    }


def vocab_of(model: torch.nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def loss_and_grads(model: torch.nn.Module, batch: dict, mode: str, chunk: int = CHUNK):
    model.zero_grad(set_to_none=True)
    total, n = loss_sum(model, batch, TrainConfig(chunked_ce=mode, ce_chunk_size=chunk))
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return total.detach(), n, grads


def reference_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Hand computation: the model's own (soft-capped) logits, F.cross_entropy(reduction='sum')."""
    kw = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        logits = model(**kw, use_cache=False).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_chunked_equals_plain_loss_and_lora_grads(base_model: torch.nn.Module, kind: str) -> None:
    model = with_lora(base_model)
    batch = (packed_batch if kind == "packed" else padded_batch)(vocab_of(model))
    try:
        plain, n_plain, g_plain = loss_and_grads(model, batch, "off")
        chunked, n_chunked, g_chunked = loss_and_grads(model, batch, "on")
        want = reference_sum(model, batch)
    finally:
        model.unload()  # give the shared base model back without adapters
    n_targets = int((batch["labels"] != IGNORE_INDEX).sum())
    assert n_plain == n_chunked == n_targets and n_targets % CHUNK != 0
    torch.testing.assert_close(plain, want, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(chunked, want, atol=1e-4, rtol=1e-6)
    assert sum(1 for k in g_plain if "lora_A" in k) == sum(1 for k in g_plain if "lora_B" in k) > 0
    assert all(g.abs().sum() > 0 for g in g_plain.values())
    assert_same_grads(g_chunked, g_plain)


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_token_nll_equals_per_token_cross_entropy(base_model: torch.nn.Module, kind: str) -> None:
    """Held-out NLL per token, in label order, equals F.cross_entropy(reduction='none') on full logits."""
    model = with_lora(base_model)
    batch = (packed_batch if kind == "packed" else padded_batch)(vocab_of(model))
    kw = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    try:
        with torch.no_grad():
            logits = model(**kw, use_cache=False).logits.float()
        got = token_nll(model, batch, chunk_size=3)
    finally:
        model.unload()
    mask = batch["labels"] != IGNORE_INDEX
    want = F.cross_entropy(logits[mask], batch["labels"][mask], reduction="none")
    assert got.shape == want.shape and got.numel() % 3 != 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_softcap_changes_the_loss() -> None:
    """Guards the test above: on Gemma 2 the cap matters, so matching the reference checks it is applied."""
    model = tiny_gemma2()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # large logits, where tanh capping bites
    batch = packed_batch(vocab_of(model))
    capped, _ = loss_sum(model, batch, TrainConfig(chunked_ce="on", ce_chunk_size=CHUNK))
    model.config.final_logit_softcapping = None
    uncapped, _ = loss_sum(model, batch, TrainConfig(chunked_ce="on", ce_chunk_size=CHUNK))
    assert (capped - uncapped).abs() > 1.0


def test_trainable_lm_head_weight_grad_matches() -> None:
    """Full fine-tuning (no LoRA): the custom Function's weight gradient equals autograd's."""
    model = tiny_gemma2().train()
    batch = padded_batch(vocab_of(model))
    _, _, g_plain = loss_and_grads(model, batch, "off")
    _, _, g_chunked = loss_and_grads(model, batch, "on")
    assert "lm_head.weight" in g_plain or "model.embed_tokens.weight" in g_plain  # Gemma ties them
    assert_same_grads(g_chunked, g_plain)


@pytest.mark.parametrize("how", ["lora_on_lm_head", "modules_to_save"])
def test_wrapped_lm_head_takes_module_path(how: str) -> None:
    """LoRA on lm_head / modules_to_save: the per-chunk checkpointed module call gives the same grads."""
    kw = (
        {"target_modules": ["q_proj", "lm_head"]}
        if how == "lora_on_lm_head"
        else {"modules_to_save": ["lm_head"]}
    )
    model = with_lora(tiny_gemma2(), **kw)
    batch = packed_batch(vocab_of(model.get_base_model()))
    plain, _, g_plain = loss_and_grads(model, batch, "off")
    chunked, _, g_chunked = loss_and_grads(model, batch, "on")
    assert any("lm_head" in k for k in g_plain)
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=1e-6)
    assert_same_grads(g_chunked, g_plain)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_ce_sum_any_chunk_size(chunk: int) -> None:
    """Direct check of the Function, chunk sizes that divide 29 or not, with soft-capping."""
    torch.manual_seed(0)
    hidden = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False).double()
    targets = torch.randint(0, 50, (29,))
    got = chunked_ce_sum(hidden, targets, head, 5.0, chunk)
    gh, gw = torch.autograd.grad(got, [hidden, head.weight])
    want = F.cross_entropy(torch.tanh(head(hidden) / 5.0) * 5.0, targets, reduction="sum")
    wh, ww = torch.autograd.grad(want, [hidden, head.weight])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)
    if chunk == 3:  # fp64 numerical gradient through tanh capping, chunks of 3 over 6 rows
        small = hidden[:6].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda h: chunked_ce_sum(h, targets[:6], head, 5.0, chunk), (small,))


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op produces, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # W.t() is [H, V] but allocates nothing
            return out
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_full_logits_never_exist() -> None:
    """Chunked: no tensor with the vocabulary as last dim has more than ce_chunk_size rows; plain: it does."""
    model = with_lora(tiny_gemma2())
    batch = packed_batch(vocab_of(model.get_base_model()))
    vocab = vocab_of(model.get_base_model())
    for mode, bound in (("on", CHUNK), ("off", None)):
        with ShapeRecorder() as rec:
            total, _ = loss_sum(model, batch, TrainConfig(chunked_ce=mode, ce_chunk_size=CHUNK))
            total.backward()
        rows = [int(torch.tensor(s[:-1]).prod()) for s in rec.shapes if s and s[-1] == vocab]
        if bound is None:
            assert max(rows) >= batch["input_ids"].numel()
        else:
            assert max(rows, default=0) <= bound


def test_packed_documents_do_not_see_each_other() -> None:
    """Packed loss = sum of each document's loss alone; proves no attention_mask reaches the model."""
    model = with_lora(tiny_gemma2()).eval()
    batch = packed_batch(vocab_of(model.get_base_model()))
    (la, lb) = batch["seq_lens"][0]
    cfg = TrainConfig(chunked_ce="on", ce_chunk_size=CHUNK)
    whole, _ = loss_sum(model, batch, cfg)
    parts = 0.0
    for sl in (slice(0, la), slice(la, la + lb)):
        one = {k: batch[k][:, sl] for k in ("input_ids", "labels", "position_ids")}
        parts += loss_sum(model, one, cfg)[0]
    torch.testing.assert_close(whole, parts, atol=1e-4, rtol=1e-6)


def test_attention_mask_only_when_batch_has_one() -> None:
    model = tiny_gemma2()
    seen: list[set[str]] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(set(kw)), with_kwargs=True)
    for mode in ("on", "off"):
        loss_sum(model, packed_batch(512), TrainConfig(chunked_ce=mode))
        loss_sum(model, padded_batch(512), TrainConfig(chunked_ce=mode))
    assert ["attention_mask" in s for s in seen] == [False, True, False, True]
    assert all(s >= {"input_ids", "position_ids", "use_cache"} for s in seen)


def test_no_targets_gives_zero_that_backprops() -> None:
    model = with_lora(tiny_gemma2())
    batch = packed_batch(512)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    total, n = loss_sum(model, batch, TrainConfig(chunked_ce="on"))
    total.backward()  # FSDP needs every rank to run backward, even on an all-prompt micro-batch
    assert n == 0 and total.item() == 0.0


def test_auto_mode_threshold() -> None:
    assert resolve_ce_mode("auto", 262_208) == "on"
    assert resolve_ce_mode("auto", 32_000) == "on"
    assert resolve_ce_mode("auto", 4096) == "off"
    assert resolve_ce_mode("off", 262_208) == "off"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["liger", "cce"])
def test_fused_kernels_equal_plain_loss_or_refuse_cleanly(mode: str, dtype: torch.dtype) -> None:
    """With the package and a GPU the fused kernel gives the plain loss and LoRA grads; without, a
    MedtuneError the CLI can print, not an ImportError (or cut-cross-entropy's fp32 backward assert)."""
    model = tiny_gemma2().to(dtype)
    if not (fused_ce_available(mode) and torch.cuda.is_available()):
        with pytest.raises(MedtuneError, match=mode):
            loss_sum(model, packed_batch(512), TrainConfig(chunked_ce=mode))
        return
    model = with_lora(model.cuda())
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed_batch(512).items()}
    if mode == "cce" and dtype == torch.float32:
        with pytest.raises(MedtuneError, match="cce needs bf16"):
            loss_sum(model, batch, TrainConfig(chunked_ce=mode))
        return
    plain, _, g_plain = loss_and_grads(model, batch, "off")
    fused, _, g_fused = loss_and_grads(model, batch, mode)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, plain, atol=1e-3, rtol=1e-5)
        assert_same_grads(g_fused, g_plain)
        return
    # bf16: both round differently inside; the sums agree to bf16 precision, the grads in direction.
    torch.testing.assert_close(fused, plain, atol=0.0, rtol=1e-2)
    assert g_fused.keys() == g_plain.keys() and g_plain
    for name, g in g_plain.items():
        cosine = F.cosine_similarity(g_fused[name].flatten().float(), g.flatten().float(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


FSDP_SCRIPT = """
import torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, Gemma2Config
from medtune.config import TrainConfig
from medtune.loss import loss_sum

dist.init_process_group("gloo")
cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                   final_logit_softcapping=30.0)

def build():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, lora).train()

ids = torch.randint(5, 512, (1, 32), generator=torch.Generator().manual_seed(0))
labels = torch.roll(ids, -1, 1)
labels[0, :4] = labels[0, 15] = labels[0, 31] = -100
batch = {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(16)] * 2)[None]}
for mode in ("on", "off"):
    ref = build()
    want, _ = loss_sum(ref, batch, TrainConfig(chunked_ce=mode, ce_chunk_size=16))
    want.backward()
    model = build()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=False)  # the root unit, as medtune.train.distributed shards it
    got, _ = loss_sum(model, batch, TrainConfig(chunked_ce=mode, ce_chunk_size=16))
    got.backward()
    torch.testing.assert_close(got, want)
    pairs = [(p.grad.full_tensor(), r.grad) for p, r in zip(model.parameters(), ref.parameters())
             if p.grad is not None]
    assert len(pairs) == 28, len(pairs)
    for g, r in pairs:
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
dist.destroy_process_group()
print("FSDP2-OK")
"""


@pytest.mark.slow
def test_fsdp2_sharded_peft_model_matches_unsharded(tmp_path: Path) -> None:
    """Under FSDP2 (2 gloo ranks) the loss goes through the root unit, so lm_head/embeddings are gathered."""
    import subprocess
    import sys

    script = tmp_path / "fsdp_loss.py"
    script.write_text(FSDP_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("FSDP2-OK") == 2


def test_training_loss_refuses_a_packed_batch_that_would_leak(tiny_llama_dir) -> None:
    """The isolation guard sits in the forward every training step takes: positions that do not
    restart per document (documents would be one long sequence) raise instead of training."""
    from transformers import AutoTokenizer

    from medtune.config import PackingConfig
    from medtune.packing import PackingIsolationError, collate

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    examples = [
        {"input_ids": tok(t).input_ids, "labels": tok(t).input_ids[1:] + [-100]}
        for t in ("고혈압 환자의 치료", "Which drug is first-line?")
    ]
    batch = collate(examples, [[0, 1]], PackingConfig(mode="packed", max_seq_len=64))
    loss_sum(model, batch, TrainConfig(chunked_ce="off"))  # isolated: fine
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with pytest.raises(PackingIsolationError, match="position_ids"):
        loss_sum(model, batch, TrainConfig(chunked_ce="off"))
