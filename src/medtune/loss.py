"""The training loss: a token-weighted sum of cross-entropies, chunked so full logits never exist.

`loss_sum` returns the SUM of per-token losses and the number of target tokens, so the training
loop divides by the global target-token count (over grad-accumulation steps and ranks) once. Averaging
per micro-batch instead would weight a short answer's tokens more than a long answer's.

One switch, `train.chunked_ce`, picks the cross-entropy: `off` the plain full-logits loss (the
reference every other path is tested against), `on` (and `auto` from 32k tokens of vocabulary) the
chunked one below, `liger` / `cce` the optional fused kernels (CUDA, their package installed).

Why chunk: Gemma 3's vocabulary has 262,208 tokens, so one 2048-token row has ~2 GiB of fp32 logits
and as much again for their gradient. The chunked path selects the target positions (labels != -100;
prompt tokens are never projected), then computes lm_head matmul (+ soft-cap) + logsumexp over
`ce_chunk_size` tokens at a time; backward recomputes each chunk. The largest vocabulary-sized tensor
alive is [ce_chunk_size, V].

How the model is called: always through its top-level module (PeftModel or *ForCausalLM) so FSDP2's
root hooks run and gather the root unit (embeddings, final norm, lm_head); calling `.model` directly
would bypass them. The final hidden states are taken with a forward hook on the decoder while
`logits_to_keep` (an all-False mask) makes the model's own lm_head project zero positions.

lm_head kinds:
- a plain floating-point `nn.Linear` (the usual case, frozen or trainable, tied or not): the custom
  autograd Function `_ChunkedLinearCE`, which also returns the weight's gradient when it requires one;
- anything else (a peft LoRA Linear on lm_head, a `modules_to_save` wrapper, an lm_head sharded by
  FSDP on its own so its weight is a DTensor, a quantised Linear): the module itself is called per
  chunk under non-reentrant `torch.utils.checkpoint`. Same memory bound, one code path for every
  module type, at the price of calling the module's forward twice per chunk.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medtune.config import CHUNKED_CE_MIN_VOCAB, TrainConfig
from medtune.errors import MedtuneError, ModelError
from medtune.format import IGNORE_INDEX
from medtune.packing import forward_kwargs


class CausalLMLoss(nn.Module):
    """The model plus its loss as one module, so FSDP2's root unit spans the whole loss computation
    (embeddings, norm and lm_head stay gathered while the chunked loss uses them)."""

    def __init__(self, model: nn.Module, train_cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, batch, self.train_cfg)


def loss_sum(model: nn.Module, batch: Mapping[str, Any], train_cfg: TrainConfig) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropies over target tokens (labels != -100) and the number of those tokens.

    Labels are pre-shifted (docs/architecture.md): hidden[t] is scored against labels[t] directly.
    The sum is fp32. A batch with no target tokens returns a zero that is still connected to the
    graph, so `backward()` works on every rank (FSDP needs every rank to run backward).
    """
    causal_lm = causal_lm_of(model)
    labels = batch["labels"]
    num_targets = int((labels != IGNORE_INDEX).sum())
    mode = resolve_ce_mode(train_cfg.chunked_ce, _vocab_size(causal_lm))
    if mode == "off":
        logits = _forward(model, causal_lm, batch, keep_logits=True)
        return _plain_ce_sum(logits, labels.to(logits.device)), num_targets
    hidden = _forward(model, causal_lm, batch, keep_logits=False)
    mask = (labels != IGNORE_INDEX).to(hidden.device)
    selected = hidden[mask]  # [N, H]: prompt and padding positions are never projected
    targets = labels.to(hidden.device)[mask]
    lm_head = causal_lm.get_output_embeddings()
    softcap = final_logit_softcap(causal_lm)
    if num_targets == 0:  # all prompt/padding: a graph-connected zero, so backward still runs on this rank
        return selected.sum(dtype=torch.float32) * 0.0, 0
    if mode in ("liger", "cce"):
        return _fused_ce_sum(mode, selected, targets, lm_head, softcap), num_targets
    return chunked_ce_sum(selected, targets, lm_head, softcap, train_cfg.ce_chunk_size), num_targets


@torch.no_grad()
def token_nll(model: nn.Module, batch: Mapping[str, Any], chunk_size: int = 256) -> torch.Tensor:
    """Per-token NLL (fp32) of every target token (labels != -100), in row-major order of `labels`.

    The evaluation twin of `loss_sum`: the same forward (so a packed batch passes the same isolation
    guard), the same soft-cap and the same pre-shifted labels, so a held-out NLL is measured exactly as
    the training loss is. Only target positions are projected, `chunk_size` at a time, through the
    lm_head module itself (any kind: plain, LoRA-wrapped or quantised).
    """
    causal_lm = causal_lm_of(model)
    hidden = _forward(model, causal_lm, batch, keep_logits=False)
    labels = batch["labels"].to(hidden.device)
    mask = labels != IGNORE_INDEX
    selected, targets = hidden[mask], labels[mask]
    lm_head = causal_lm.get_output_embeddings()
    softcap = final_logit_softcap(causal_lm)
    parts = [torch.zeros(0, dtype=torch.float32, device=hidden.device)]
    for start in range(0, targets.numel(), chunk_size):
        logits = _module_chunk_logits(lm_head, selected[start : start + chunk_size], softcap)
        parts.append(F.cross_entropy(logits, targets[start : start + chunk_size], reduction="none"))
    return torch.cat(parts)


def resolve_ce_mode(mode: str, vocab_size: int) -> str:
    """`auto` becomes `on` for vocabularies of 32k tokens or more, else `off`; other modes pass through."""
    if mode == "auto":
        return "on" if vocab_size >= CHUNKED_CE_MIN_VOCAB else "off"
    return mode


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` inside `model` (a PeftModel, possibly FSDP2-wrapped, or the causal LM itself).

    FSDP2's `fully_shard` swaps a module's class for a subclass but keeps its attributes, so the
    lookups below work on sharded models too.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "get_output_embeddings") and hasattr(inner, "model")):
        raise ModelError(
            f"{type(inner).__name__} is not a causal LM with a decoder (`.model`) and an lm_head"
        )
    if inner.get_output_embeddings() is None:
        raise ModelError(f"{type(inner).__name__} has no lm_head (get_output_embeddings() is None)")
    return inner


def final_logit_softcap(causal_lm: nn.Module) -> float | None:
    """Gemma 2 (and Gemma 3 when set) cap logits as cap * tanh(logits / cap) before the softmax."""
    cap = getattr(_text_config(causal_lm), "final_logit_softcapping", None)
    return float(cap) if cap else None


def chunked_ce_sum(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None, chunk_size: int
) -> torch.Tensor:
    """Sum of CE(lm_head(hidden[i]) (+ soft-cap), targets[i]) over rows of `hidden` [N >= 1, H], in chunks.

    The one chunked path, for every lm_head: a plain Linear through `_ChunkedLinearCE`, any other
    module through itself under checkpoint (see the module docstring).
    """
    weight = getattr(lm_head, "weight", None)
    if _is_plain_linear(lm_head, weight):
        return _ChunkedLinearCE.apply(hidden, weight, targets, chunk_size, softcap)
    return _checkpointed_module_ce(hidden, targets, lm_head, softcap, chunk_size)


def _is_plain_linear(lm_head: nn.Module, weight: torch.Tensor | None) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear but stores uint8 `Params4bit`, and a DTensor weight
    # (lm_head sharded on its own) needs the module's FSDP hooks: both take the module path.
    return (
        isinstance(lm_head, nn.Linear)
        and lm_head.bias is None
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.is_floating_point()
    )


def _text_config(causal_lm: nn.Module) -> Any:
    config = causal_lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vocab_size(causal_lm: nn.Module) -> int:
    return int(_text_config(causal_lm).vocab_size)


def _forward(
    model: nn.Module, causal_lm: nn.Module, batch: Mapping[str, Any], keep_logits: bool
) -> torch.Tensor:
    """Run the top-level model; return its logits [B, T, V] or the decoder's final hidden states [B, T, H]."""
    kwargs = forward_kwargs(causal_lm, batch)  # no mask on a packed batch, guarded against leaks
    if keep_logits:
        return model(**kwargs).logits
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = causal_lm.model.register_forward_hook(grab)
    try:
        # An all-False boolean mask: the model's own lm_head projects zero positions.
        no_positions = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        model(**kwargs, logits_to_keep=no_positions)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ModelError(f"expected one decoder forward per model forward, saw {len(captured)}")
    return captured[0]


def _plain_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference path: full logits (already soft-capped by the model), CE in fp32, reduction sum."""
    flat = _upcast(logits).reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for the softmax; fp64 stays fp64 (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _capped_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of one chunk, soft-capped like transformers does (after the projection)."""
    logits = _upcast(hidden @ weight.t())  # matmul in the compute dtype, like nn.Linear, then upcast
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(
            softcap
        )  # in place: `tanh(x / c) * c` would allocate two more blocks
    return logits


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(softcap(hidden[i] @ W^T), targets[i]) with only one [chunk, V] block alive at a time.

    Forward keeps hidden, weight (both already held elsewhere) and the per-token logsumexp ([N] fp32).
    Backward recomputes each chunk's logits: dL/dz = softmax(z) - onehot(target), times the soft-cap
    derivative 1 - tanh^2 = 1 - (z_capped / cap)^2, then dL/dh = g @ W and dL/dW += g^T @ h.
    Everything on the [chunk, V] block is done in place, so one fp32 block is alive at a time (two in
    backward with soft-capping; plus the matmul's bf16 output before its upcast in bf16 training).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        softcap: float | None,
    ) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _capped_logits(hidden[start:end], weight, softcap)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)
            lse[start:end] = _logsumexp_(logits)
            total += (lse[start:end] - target_logit).sum()
            del logits  # else the loop variable keeps this block alive while the next one is computed
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None  # fp32 accumulation
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            grad_logits = _chunk_logit_grad(h, weight, targets[start:end], lse[start:end], ctx.softcap)
            grad_logits = grad_logits.mul_(grad_total).to(weight.dtype)
            if need_h:
                grad_h[start:end] = grad_logits @ weight
            if need_w:
                grad_w += grad_logits.t() @ h
            del grad_logits  # free this block before the next chunk's is computed
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row logsumexp that overwrites `logits`: torch.logsumexp would allocate a second [chunk, V] block."""
    row_max = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(1))


def _chunk_logit_grad(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """d(sum CE)/d(raw logits) for one chunk, fp32 [chunk, V], computed in place on the recomputed logits."""
    logits = _capped_logits(h, weight, softcap)
    # The soft-cap derivative needs the capped logits and the softmax at once: one extra block.
    cap_grad = (logits / softcap).square_().neg_().add_(1.0) if softcap is not None else None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second [chunk, V] block
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    if cap_grad is not None:
        grad.mul_(cap_grad)
    return grad


def _checkpointed_module_ce(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None, chunk_size: int
) -> torch.Tensor:
    """Call the lm_head module itself per chunk under non-reentrant checkpoint (LoRA, DTensor, quantised)."""
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _module_chunk_ce, lm_head, hidden[start:end], targets[start:end], softcap, use_reentrant=False
        )
    return total


def _module_chunk_ce(lm_head: nn.Module, h: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    return F.cross_entropy(_module_chunk_logits(lm_head, h, softcap), targets, reduction="sum")


def _module_chunk_logits(lm_head: nn.Module, h: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of one chunk through the lm_head module itself (any kind), soft-capped like the model."""
    logits = _upcast(lm_head(h))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def fused_ce_available(mode: str) -> bool:
    """Whether the fused-kernel package for `mode` ('liger' or 'cce') is installed."""
    package = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[mode]
    return importlib.util.find_spec(package) is not None


def _fused_ce_sum(
    mode: str, hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None
) -> torch.Tensor:
    """Liger's fused linear CE or Apple's cut-cross-entropy, CUDA only; a clear error otherwise."""
    package = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}[mode]
    if not fused_ce_available(mode):
        raise MedtuneError(
            f"train.chunked_ce: {mode} needs the `{package}` package, which is not installed; "
            f"install it or use chunked_ce: on (same memory bound, pure PyTorch)"
        )
    if hidden.device.type != "cuda":
        raise MedtuneError(
            f"train.chunked_ce: {mode} runs on CUDA only; on {hidden.device.type} use chunked_ce: on"
        )
    if mode == "cce" and hidden.dtype not in (torch.bfloat16, torch.float16):
        # cut-cross-entropy's backward asserts bf16/fp16 embeddings (seen on an H200): refuse before the step.
        raise MedtuneError(
            f"train.chunked_ce: cce needs bf16 or fp16 compute, this model computes in "
            f"{str(hidden.dtype).removeprefix('torch.')} (model.dtype); use chunked_ce: on or liger"
        )
    weight = getattr(lm_head, "weight", None)
    if not _is_plain_linear(lm_head, weight):
        raise MedtuneError(
            f"train.chunked_ce: {mode} needs a plain lm_head Linear (got {type(lm_head).__name__}, e.g. LoRA "
            f"on lm_head); use chunked_ce: on"
        )
    return _fused_kernel(mode)(hidden, weight, targets, softcap)


def _fused_kernel(mode: str) -> Callable[..., torch.Tensor]:
    if mode == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        def liger(hidden, weight, targets, softcap):
            fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
            return fn(weight, hidden, targets).float()

        return liger
    from cut_cross_entropy import linear_cross_entropy

    def cce(hidden, weight, targets, softcap):
        # shift=False: medtune's labels are already shifted.
        return linear_cross_entropy(
            hidden, weight, targets, softcap=softcap, reduction="sum", shift=False
        ).float()

    return cce
