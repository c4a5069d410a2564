"""GPU memory of a QLoRA training step, by component, from the model's shape and the run's options.

The plan adds up what one rank holds at the peak of a training step:

  static      frozen base weights (quantised linears + quant state, unquantised embeddings/norms),
              LoRA adapter (fp32), its gradients (fp32), optimiser state (AdamW: 2 x fp32 per
              trainable parameter; 8-bit: 2 x 1 byte + block scales); all sharded over FSDP ranks,
              plus the all-gathered layers FSDP holds unsharded while computing.
  activations the tensors autograd saves per decoder layer (inventory in `layer_activation_bytes`),
              for every layer without checkpointing, or only the layer inputs with it (moved to
              host memory with activation offload); the loss peak: fp32 log-probs and gradients
              for B x T x V entries (dominant for Gemma's 262k vocabulary) or, with chunked
              cross-entropy, one chunk of tokens. The step's peak is the larger of the loss
              backward (saved activations + loss peak) and the layer backward (LoRA gradients +
              one recomputed layer + its working set). T is the row length: packed rows are full,
              padded rows are planned at max_seq_len, the worst case.
  overhead    CUDA context + cuBLAS workspace: about 0.5-1 GB depending on driver, lazy module
              loading and libraries (not measured here); we plan with 1.0 GB.

Numbers are estimates of *allocated* bytes; fragmentation can add ~5-10 %, which is why the verdict
keeps a margin. `benchmarks/memory.py` checks the estimate against measured steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from medtune.plan.shape import ModelShape, as_shape

GIB = 1024**3
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize (absmax per 64 weights)
NESTED_BLOCK = 256  # double quant: fp32 scale per 256 uint8 absmax values
INT8_OPTIM_BLOCK = 2048  # bitsandbytes 8-bit optimiser blocksize (one fp32 absmax per block per state)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class PlanOptions:
    """Everything besides the model that decides memory. Defaults: medtune's QLoRA defaults on CUDA."""

    quant: str = "nf4"  # none | nf4 | fp4 | int8
    double_quant: bool = True
    dtype: str = "bfloat16"  # compute dtype; frozen unquantised weights are stored in it
    lora_r: int = 16
    lora_targets: list[str] | str = "all-linear"
    lora_dropout: float = 0.05
    use_dora: bool = False
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    attention: str = "sdpa"  # eager keeps the T x T attention probabilities per layer
    seq_len: int = 2048
    micro_batch: int = 1
    checkpoint_every_k: int | None = 1  # None: no activation checkpointing
    activation_offload: bool = False
    chunked_ce: bool = True
    ce_chunk: int = 256
    gpus: int = 1  # FSDP ranks sharing the static memory
    overhead_gb: float = 1.0  # CUDA context, cuBLAS workspace; 0 for CPU planning
    margin: float = 0.05  # keep this fraction of the card free for fragmentation


@dataclass
class MemoryPlan:
    """Bytes per rank, by component, and the derived verdict numbers."""

    shape: ModelShape
    options: PlanOptions
    components: dict[str, int] = field(default_factory=dict)

    @property
    def static_bytes(self) -> int:
        """Held for the whole run: weights, quant state, adapter, optimiser state, FSDP buffers."""
        keys = (
            "base_quantized",
            "quant_state",
            "base_unquantized",
            "adapter",
            "optimizer",
            "fsdp_unsharded_layers",
            "runtime_overhead",
        )
        return sum(self.components.get(k, 0) for k in keys)

    @property
    def total_bytes(self) -> int:
        """Peak of the step: the loss backward (all saved activations + the logits' peak, no LoRA
        gradients yet) or the layers' backward (gradients + one layer's recompute and working set)."""
        c = self.components
        return (
            self.static_bytes
            + c["activations_saved"]
            + max(c["loss_peak"], c["gradients"] + c["layer_backward_peak"])
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": asdict(self.shape),
            "options": asdict(self.options),
            "components": self.components,
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_bytes / GIB, 3),
        }


# ----------------------------------------------------------------------------- static memory


def quantized_linear_bytes(n_in: int, n_out: int, quant: str, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quant-state bytes) of one bitsandbytes linear, as bnb lays them out.

    4-bit: two weights per byte; an absmax per 64 weights, fp32, or with double quant uint8 plus an
    fp32 scale per 256 absmax values, plus the code books (16 and 256 fp32) and an fp32 offset.
    int8 (LLM.int8): one byte per weight plus an fp32 scale per output row.
    """
    n = n_in * n_out
    if quant == "int8":
        return n, 4 * n_out
    blocks = math.ceil(n / NF4_BLOCK)
    if double_quant:
        return math.ceil(n / 2), blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * (16 + 256 + 1)
    return math.ceil(n / 2), 4 * blocks + 4 * 16


def lora_targets(shape: ModelShape, targets: list[str] | str) -> dict[str, tuple[int, int]]:
    """The per-layer linears LoRA wraps: all of them for 'all-linear' (lm_head is never targeted)."""
    linears = shape.linear_shapes()
    if targets == "all-linear":
        return linears
    names = [targets] if isinstance(targets, str) else list(targets)
    return {k: v for k, v in linears.items() if any(k == t or k.endswith(t) for t in names)}


def adapter_params(shape: ModelShape, opts: PlanOptions) -> int:
    """LoRA A (r x in) and B (out x r) per target per layer; DoRA adds a magnitude vector (out)."""
    per_layer = sum(
        opts.lora_r * (i + o) + (o if opts.use_dora else 0)
        for i, o in lora_targets(shape, opts.lora_targets).values()
    )
    return shape.layers * per_layer


def optimizer_bytes(trainable: int, optimizer: str) -> int:
    """AdamW keeps exp_avg and exp_avg_sq: fp32 (8 B/param) or 8-bit blockwise (2 B + scales)."""
    if optimizer == "adamw":
        return 8 * trainable
    return 2 * trainable + 2 * 4 * math.ceil(trainable / INT8_OPTIM_BLOCK)


def static_components(shape: ModelShape, opts: PlanOptions) -> dict[str, int]:
    """Weights, quant state, adapter, gradients and optimiser state, before FSDP sharding."""
    a = DTYPE_BYTES[opts.dtype]
    packed = state = 0
    if opts.quant != "none":
        for n_in, n_out in shape.linear_shapes().values():
            p, s = quantized_linear_bytes(n_in, n_out, opts.quant, opts.double_quant)
            packed, state = packed + p, state + s
        packed, state = packed * shape.layers, state * shape.layers
        unquantized = shape.total_params() - shape.layers * shape.linear_params_per_layer()
    else:
        unquantized = shape.total_params()
    trainable = adapter_params(shape, opts)
    return {
        "base_quantized": packed,
        "quant_state": state,
        "base_unquantized": a * unquantized,
        "adapter": 4 * trainable,
        "gradients": 4 * trainable,
        "optimizer": optimizer_bytes(trainable, opts.optimizer),
    }


def shard_static(static: dict[str, int], shape: ModelShape, opts: PlanOptions) -> dict[str, int]:
    """FSDP divides static memory by the ranks but holds ~2 layers unsharded (current + prefetched)."""
    if opts.gpus <= 1:
        return static
    sharded = {k: math.ceil(v / opts.gpus) for k, v in static.items()}
    layer_bytes = (static["base_quantized"] + static["quant_state"] + static["adapter"]) / shape.layers
    layer_bytes += DTYPE_BYTES[opts.dtype] * shape.small_params_per_layer()
    sharded["fsdp_unsharded_layers"] = int(2 * layer_bytes)
    return sharded


# ----------------------------------------------------------------------------- activations


def _lora_saved_bytes(tokens: int, n_in: int, opts: PlanOptions) -> int:
    """What peft's LoRA branch keeps per target: dropout mask (1 B) and its fp32 output for lora_A's
    backward, then lora_A's output (r, fp32) for lora_B's. Without dropout lora_A saves its input,
    which is a new tensor only when the input is upcast from bf16 to the fp32 adapter dtype."""
    a = DTYPE_BYTES[opts.dtype]
    if opts.lora_dropout > 0:
        per_token = n_in * (1 + max(a, 4))
    else:
        per_token = n_in * 4 if a < 4 else 0
    return tokens * (per_token + 4 * opts.lora_r)


def layer_activation_bytes(shape: ModelShape, opts: PlanOptions) -> int:
    """Bytes autograd saves in one decoder layer's forward (frozen base, LoRA on `lora_targets`).

    Inventory (N tokens, a = compute dtype bytes): each RMSNorm saves its input upcast to fp32 and
    the rsqrt (N x H x 4 + N x 4); q_norm/k_norm likewise per head; SDPA saves q, k, v, its output
    and the logsumexp (flash / efficient kernels: no T x T matrix); the MLP saves gate, act(gate) and
    up (3 x N x I x a); LoRA adds `_lora_saved_bytes` per target. Frozen linears (plain or bnb 4-bit)
    save nothing: their input gradient needs only the weight. Without dropout (or in fp32) a layer
    input shared by several targets is saved once, by whichever lora_A uses it.
    """
    a = DTYPE_BYTES[opts.dtype]
    n = opts.micro_batch * opts.seq_len
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = shape.norms_per_layer * n * (4 * h + 4)
    if shape.qk_norm:
        norms += n * 4 * (q + kv) + 4 * n * (shape.heads + shape.kv_heads)
    attention = n * a * (q + 2 * kv + q) + 4 * n * shape.heads
    if opts.attention == "eager":  # fp32 softmax output, plus its cast back to bf16 for the value matmul
        attention += opts.micro_batch * shape.heads * opts.seq_len**2 * (4 + (a if a < 4 else 0))
    mlp = 3 * n * i * a
    targets = lora_targets(shape, opts.lora_targets)
    lora = sum(_lora_saved_bytes(n, n_in, opts) for n_in, _ in targets.values())
    shared_inputs = {"attn": h, "o": q, "mlp": h, "down": i}
    # bitsandbytes int8 matmuls save their input A for the backward (and so does lora_A without
    # dropout in fp32): one copy per distinct layer input, since q/k/v and gate/up share theirs.
    if opts.quant == "int8" or (opts.lora_dropout == 0 and a >= 4):
        lora += n * a * sum(shared_inputs.values())
    return norms + attention + mlp + lora


def backward_working_bytes(shape: ModelShape, opts: PlanOptions) -> int:
    """Gradients of activations alive at once inside one layer's backward (~ the MLP's widest point)."""
    n = opts.micro_batch * opts.seq_len
    return n * DTYPE_BYTES[opts.dtype] * (3 * shape.intermediate + 2 * shape.hidden)


def logits_bytes(shape: ModelShape, opts: PlanOptions) -> int:
    """Peak of the loss backward: fp32 log-probs (saved by log_softmax) + their gradient + the logits'
    fp32 gradient, 12 B per token x vocab entry; the logits themselves are not saved (the frozen
    lm_head needs only its weight) and the bf16 cast of the gradient comes after the first two are
    freed. For every token, or one chunk of tokens with chunked cross-entropy."""
    n = opts.micro_batch * opts.seq_len
    if not opts.chunked_ce:
        return n * shape.vocab * 12
    # medtune.loss's chunked path keeps one fp32 [chunk, vocab] block alive, recomputed in backward and
    # turned into its gradient in place (measured: benchmarks/chunked_ce.py); bf16 compute adds the
    # matmul's bf16 output before the upcast. Final-logit soft-capping would add one more fp32 block.
    per_entry = 4 + (2 if DTYPE_BYTES[opts.dtype] == 2 else 0)
    return min(n, opts.ce_chunk) * shape.vocab * per_entry


def activation_components(shape: ModelShape, opts: PlanOptions) -> dict[str, int]:
    """Activations saved at the start of backward, the loss peak, and one layer's backward peak
    (its recompute when checkpointed, plus the working set); `MemoryPlan.total_bytes` combines them."""
    a = DTYPE_BYTES[opts.dtype]
    n = opts.micro_batch * opts.seq_len
    per_layer = layer_activation_bytes(shape, opts)
    boundary = n * shape.hidden * a  # a checkpointed layer keeps only its input hidden states
    if opts.checkpoint_every_k is None:
        checkpointed = 0
    else:
        checkpointed = math.ceil(shape.layers / opts.checkpoint_every_k)
    kept = (shape.layers - checkpointed) * per_layer
    inputs = 0 if opts.activation_offload else checkpointed * boundary
    final_norm = n * (4 * shape.hidden + 4) + n * shape.hidden * a
    layer_peak = (per_layer if checkpointed else 0) + backward_working_bytes(shape, opts)
    return {
        "activations_saved": kept + inputs + final_norm,
        "loss_peak": logits_bytes(shape, opts),
        "layer_backward_peak": layer_peak,
    }


def plan_memory(model_config: dict[str, Any] | ModelShape, opts: PlanOptions) -> MemoryPlan:
    """The per-rank memory of one training step of `model_config` under `opts` (see module docstring)."""
    shape = as_shape(model_config)
    components = shard_static(static_components(shape, opts), shape, opts)
    components.update(activation_components(shape, opts))
    components["runtime_overhead"] = int(opts.overhead_gb * GIB)
    return MemoryPlan(shape=shape, options=opts, components=components)
