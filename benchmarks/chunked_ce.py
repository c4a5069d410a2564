"""Chunked cross-entropy vs full logits: peak memory of one LoRA training step with Gemma 3's vocabulary.

Claim: with Gemma 3's real vocabulary (262,208 tokens) at 2048 tokens, the vocabulary-sized tensors'
bytes at the step's peak fall by >= 10x with `chunked_ce: on` at ce_chunk_size 256, and the loss is
the same. Rows for the config default (1024) show why the chunk must be small next to the row length:
chunked CE keeps one [chunk, V] fp32 block alive, plain CE about three [tokens, V] blocks (log-probs,
their gradient and the logits' gradient), so the fall is ~3 x tokens / chunk. The model is deliberately
narrow (hidden 128, 2 layers) so the loss dominates, as it does for 1B-4B Gemma models at long rows.

Measured: `medtune.model.measure.peak_training_memory` (CUDA allocator statistics, or on CPU a
dispatch mode tracking live tensor bytes), plus a second dispatch mode here that splits the live
bytes at the peak into "vocab-sized" tensors (last dim = V: logits, log-probs, their gradients) and
the rest. Planned: `medtune.plan.plan_memory` for the same shape (activations + loss peak; weights
excluded on both sides). The row is a packed row of four 512-token documents where every token but
each document's last is a target: the worst case for chunking (no prompt tokens to skip).

    python benchmarks/chunked_ce.py [--tokens 2048] [--chunks 1024,256] [--cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from _common import model_sizes
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from medtune.config import TrainConfig
from medtune.loss import IGNORE_INDEX, loss_sum

RESULTS = Path(__file__).parent / "results" / "chunked_ce.json"
GEMMA3_VOCAB = 262_208
MIB = 1024**2


class VocabShareTracker(TorchDispatchMode):
    """Live bytes created inside the mode, split into tensors whose last dim is the vocabulary and the rest.

    Keeps the split at the moment of the overall peak. Storages are keyed by identity and freed through
    a weak reference, like `medtune.model.measure.LiveTensorTracker`; views and in-place results (which
    share an input's storage) are not counted again.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.live = {"vocab": 0, "other": 0}
        self.peak = 0
        self.vocab_at_peak = 0
        self.max_vocab = 0
        self._refs: dict[int, Any] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(
                    t.untyped_storage(), "vocab" if t.dim() and t.shape[-1] == self.vocab else "other"
                )
        return out

    def _track(self, storage: torch.UntypedStorage, kind: str) -> None:
        key = storage.data_ptr()
        if key in self._refs or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes, c=kind: self._free(k, n, c))
        self.live[kind] += nbytes
        total = self.live["vocab"] + self.live["other"]
        self.max_vocab = max(self.max_vocab, self.live["vocab"])
        if total > self.peak:
            self.peak, self.vocab_at_peak = total, self.live["vocab"]

    def _free(self, key: int, nbytes: int, kind: str) -> None:
        self._refs.pop(key, None)
        self.live[kind] -= nbytes


def build_model(device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Gemma3TextConfig]:
    config = Gemma3TextConfig(
        **model_sizes(GEMMA3_VOCAB, 128, 256, 2, 4, 2),
        head_dim=32,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, lora).train(), config


def packed_row(tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Four documents; labels pre-shifted, -100 on each document's last token; no attention_mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, GEMMA3_VOCAB, (1, tokens), generator=g)
    doc = tokens // 4
    labels = torch.roll(ids, -1, dims=1)
    labels[0, doc - 1 :: doc] = IGNORE_INDEX
    positions = (torch.arange(tokens) % doc)[None]
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}


def measure(
    model: torch.nn.Module, batch: dict, mode: str, chunk: int, device: torch.device
) -> dict[str, Any]:
    """One forward+backward; peak live bytes (measure.py) and the vocab-sized share at the peak (ours)."""
    from medtune.model.measure import peak_training_memory

    cfg = TrainConfig(chunked_ce=mode, ce_chunk_size=chunk)
    tracker = VocabShareTracker(GEMMA3_VOCAB)
    result: dict[str, Any] = {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with tracker:
            total, n = loss_sum(model, batch, cfg)
            total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.update(loss_per_token=total.item() / n, targets=n, seconds=time.perf_counter() - start)

    peak = peak_training_memory(step, device)
    return {
        **result,
        "peak_bytes": peak["peak_delta_bytes"],
        "tracked_peak_bytes": tracker.peak,
        "vocab_bytes_at_peak": tracker.vocab_at_peak,
        "max_live_vocab_bytes": tracker.max_vocab,
    }


def planned(config: Gemma3TextConfig, tokens: int, chunk: int, chunked: bool, dtype: str) -> dict[str, Any]:
    """The planner's step memory beyond static weights/optimiser/overhead, and its logits term.

    'planner: n/a' when `medtune.plan` is missing or its API differs from what this script expects.
    """
    try:
        from medtune.plan import PlanOptions, logits_bytes, model_shape, plan_memory

        opts = PlanOptions(
            quant="none",
            dtype=dtype,
            lora_r=16,
            lora_dropout=0.0,
            seq_len=tokens,
            checkpoint_every_k=None,
            chunked_ce=chunked,
            ce_chunk=chunk,
            overhead_gb=0.0,
        )
        plan = plan_memory(config.to_dict(), opts)
        dynamic = plan.total_bytes - plan.static_bytes - plan.components.get("runtime_overhead", 0)
        return {
            "planned_activation_and_loss_bytes": dynamic,
            "planned_logits_bytes": logits_bytes(model_shape(config.to_dict()), opts),
        }
    except (ImportError, AttributeError, KeyError, TypeError) as exc:
        return {"planner": f"n/a ({type(exc).__name__}: {exc})"}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{platform.system()} {platform.release()}, torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunks", default="1024,256", help="ce_chunk_size values for the chunked rows")
    parser.add_argument("--cuda", action="store_true", help="run on CUDA in bf16 (default: CPU, fp32)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype_name = "bfloat16" if args.cuda else "float32"
    model, config = build_model(device, getattr(torch, dtype_name))
    batch = packed_row(args.tokens, device)
    rows = {"off": measure(model, batch, "off", 1024, device)}
    rows["off"].update(planned(config, args.tokens, 1024, False, dtype_name))
    for chunk in (int(c) for c in args.chunks.split(",")):
        rows[f"on@{chunk}"] = measure(model, batch, "on", chunk, device)
        rows[f"on@{chunk}"].update(planned(config, args.tokens, chunk, True, dtype_name))
    report(rows, args, device, dtype_name)


def report(
    rows: dict[str, dict[str, Any]], args: argparse.Namespace, device: torch.device, dtype: str
) -> None:
    plain = rows["off"]
    print(
        f"machine: {machine(device)}; dtype {dtype}; vocab {GEMMA3_VOCAB}; tokens {args.tokens}; "
        f"LoRA r16 all-linear; hidden 128, 2 layers"
    )
    print(
        f"{'chunked_ce':<11}{'loss/token':>11}{'peak MiB':>10}{'vocab MiB@peak':>15}{'share':>7}"
        f"{'fall':>7}{'planned MiB':>12}{'planned logits MiB':>19}{'seconds':>9}"
    )
    for mode, r in rows.items():
        r["vocab_share_at_peak"] = r["vocab_bytes_at_peak"] / r["tracked_peak_bytes"]
        r["vocab_bytes_fall"] = plain["vocab_bytes_at_peak"] / max(r["vocab_bytes_at_peak"], 1)
        plan_total = r.get("planned_activation_and_loss_bytes")
        plan_logits = r.get("planned_logits_bytes")
        print(
            f"{mode:<11}{r['loss_per_token']:>11.5f}{r['peak_bytes'] / MIB:>10.0f}"
            f"{r['vocab_bytes_at_peak'] / MIB:>15.0f}{r['vocab_share_at_peak']:>7.1%}"
            f"{r['vocab_bytes_fall']:>6.1f}x"
            f"{_mib(plan_total):>12}{_mib(plan_logits):>19}{r['seconds']:>9.1f}"
        )
    best = max(r["vocab_bytes_fall"] for m, r in rows.items() if m != "off")
    print(f"largest fall of vocab-sized bytes at the peak: {best:.1f}x (claim: >= 10x at ce_chunk_size 256)")
    if "planner" in plain:
        print(f"planner: {plain['planner']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine(device),
                "device": device.type,
                "dtype": dtype,
                "vocab": GEMMA3_VOCAB,
                "tokens": args.tokens,
                "rows": rows,
                "largest_vocab_bytes_fall": best,
                "claim_met": best >= 10,
                "command": "python benchmarks/chunked_ce.py "
                + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not False),
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")


def _mib(nbytes: int | None) -> str:
    return f"{nbytes / MIB:.0f}" if nbytes is not None else "n/a"


if __name__ == "__main__":
    main()
