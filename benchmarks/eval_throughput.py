"""Questions per second: medtune's scorer vs lm-evaluation-harness on the same model and items.

Two comparisons, measured in one process on the same CPU threads, the systems taking turns in each
of `--repeats` rounds (best time kept), after a short warm-up of both:

  (i)  same formulation on both sides: medtune letter mode (one forward per question, next-token
       log-probs of " A".." E") vs lm-eval `loglikelihood` of the continuations " A".." E"
       (lm-eval groups the five single-token requests that share a context into one forward).
       Target >= 1.5x.
  (ii) medtune letter mode vs lm-eval option-text log-likelihood (the usual harness MCQA task:
       one row per option). Target >= 4x.

Each comparison runs at two settings, one after the other in the same process: `best` (bf16 on both
sides where the CPU multiplies it natively, by medtune's `dtype: auto` rule; lm-eval's own `dtype=auto`
also picks bf16 for a bf16 checkpoint such as Gemma 3, and keeps its default `softmax_dtype`, i.e.
log-softmax in bf16) and `equal` (fp32 on both sides). Both sides score the same model object with
the same batch size and threads. In bf16, near-tied letters can flip between the two (different
shapes round differently), so the run also reports each side's bf16 predictions against the fp32 ones.

Model: `--model DIR` (e.g. the real Gemma 3 270M, chat template) or by default a random tiny Llama
with hidden 256, 4 layers, 8 heads (about 5M parameters, plain template), so a forward pass is real
work and the timing is not only Python overhead; absolute numbers on a shared CPU mean little, so
the ratios are what to read.

Where (i)'s gain comes from: both sides run one forward per question, but lm-eval computes and
log-softmaxes logits at every position ([B, T, vocab]) while medtune asks for the last position
only (`logits_to_keep`), and runs the final decoder layer's MLP and attention output projection on
that position only (`score.final_layer_on_last_positions`). The lm_head part of the gain grows with
the vocabulary: `--vocab` pads the tiny model's vocabulary (its tokenizer has 4096 tokens; real small
models have 32k-262k) to show it; the final-layer part is about 1/(number of layers) of the
per-layer work, so it shrinks on deep models.

    python benchmarks/eval_throughput.py [--model DIR] [--items 100] [--batch-size 8] [--repeats 2]
        [--settings best,equal] [--no-options] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import add_threads_option  # noqa: E402

from medtune.config import FormatConfig, SourceConfig  # noqa: E402
from medtune.data.read import iter_source  # noqa: E402
from medtune.evaluate import score as S  # noqa: E402
from medtune.evaluate.prompts import build_items  # noqa: E402
from medtune.model.tiny import build_tiny_model  # noqa: E402

DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", "/work/shared/data"))
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)


def load_records(n: int) -> list[dict]:
    """n/2 MedQA dev items and n/2 KorMedMCQA valid items (interleaved professions)."""
    medqa = SourceConfig(path=DATA / "medqa" / "phrases_no_exclude_dev.jsonl", format="medqa", name="medqa")
    kor = SourceConfig(path=DATA / "kormedmcqa", format="kormedmcqa", name="kormedmcqa", split="valid")
    out = []
    for src in (medqa, kor):
        got = [r for r in iter_source(src, "eval") if isinstance(r, dict) and r.get("kind") == "mcqa"]
        got = [r for _, r in sorted(enumerate(got), key=lambda ir: (ir[0] % 50, ir[0]))]
        out += got[: n // 2]
    return out


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Best wall time (and last result) of each function over `repeats` rounds.

    The functions take turns within each round, so a burst of other load on a shared machine hits
    both sides of a ratio alike instead of whichever happened to run during it; the best time is
    the run least disturbed.
    """
    out: dict[str, tuple[float, object]] = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            result = fn()
            out[name] = (min(out[name][0], time.perf_counter() - t0), result)
    return out


def compute_dtype(setting: str) -> torch.dtype:
    """best: bf16 where the CPU multiplies it natively (medtune's `dtype: auto` rule; lm-eval's
    `dtype=auto` reads the checkpoint's own dtype, bf16 for Gemma 3, so both sides agree), else fp32;
    equal: fp32 on both sides."""
    from medtune.model.cpu_caps import cpu_bf16_choice

    return torch.bfloat16 if setting == "best" and cpu_bf16_choice()[0] else torch.float32


def agreement(items: list, ours: list[dict], theirs: list) -> dict:
    """Share of items where medtune's predicted letter equals lm-eval's, the largest gap between the
    two sides' log-probabilities of the same letter, and both sides' predicted letters."""
    gap, start, preds_theirs = 0.0, 0, []
    for it, o in zip(items, ours, strict=True):
        lls = [ll for ll, _ in theirs[start : start + len(it["targets"])]]
        start += len(it["targets"])
        preds_theirs.append("ABCDE"[lls.index(max(lls))])
        gap = max(gap, *(abs(a - b) for a, b in zip(o["scores"], lls, strict=True)))
    preds_ours = [o["predicted"] for o in ours]
    return {
        "prediction_agreement": share_same(preds_ours, preds_theirs),
        "max_abs_letter_logprob_diff": gap,
        "predictions": {"medtune": preds_ours, "lm_eval": preds_theirs},
    }


def share_same(a: list[str], b: list[str]) -> float:
    """Share of positions where two prediction lists agree."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def against_fp32(results: dict) -> dict:
    """Each side's bf16 predictions against the fp32 ones (medtune's, equal to lm-eval's when they
    agree): where the two sides disagree in bf16, which one moved away from full precision."""
    if "best" not in results or "equal" not in results or results["best"]["dtype"] == "float32":
        return {}
    ref = results["equal"]["predictions"]["medtune"]
    return {side: share_same(preds, ref) for side, preds in results["best"]["predictions"].items()}


def measure(model, tokenizer, items: list, args: argparse.Namespace) -> dict:
    """One setting: the systems timed in turns (best of `--repeats`), rows, ratios and agreement."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")

    def harness(pairs):
        reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        return lambda: lm.loglikelihood(reqs, disable_tqdm=True)

    letter_pairs = [(it["prompt"], t) for it in items for t in it["targets"]]
    # warm-up of both sides (allocator, kernels) on the first few questions
    S.score_items(model, tokenizer, items[:8], "letter", args.batch_size)
    harness(letter_pairs[: sum(len(it["targets"]) for it in items[:8])])()
    systems = {
        "ours": lambda: S.score_items(model, tokenizer, items, "letter", args.batch_size),
        "letters": harness(letter_pairs),
    }
    if args.options:
        systems["options"] = harness([p for it in items for p in S.option_pairs(it)])
        systems["ours_loglik"] = lambda: S.score_items(model, tokenizer, items, "loglik", args.batch_size)
    times = timed(systems, args.repeats)
    n = len(items)
    labels = {
        "ours": "medtune letter",
        "letters": "lm-eval loglik ' A'..' E'",
        "options": "lm-eval loglik option text",
        "ours_loglik": "medtune loglik option text",
    }
    rows = [{"system": labels[k], "seconds": t, "q_per_s": n / t} for k, (t, _) in times.items()]
    ratios = {"letter_vs_lm_eval_letters": times["letters"][0] / times["ours"][0]}
    if args.options:
        ratios["letter_vs_lm_eval_options"] = times["options"][0] / times["ours"][0]
        ratios["loglik_vs_lm_eval_options"] = times["options"][0] / times["ours_loglik"][0]
    agree = agreement(items, times["ours"][1], times["letters"][1])
    return {"dtype": str(model.dtype).removeprefix("torch."), "rows": rows, "ratios": ratios, **agree}


def load_model(model_dir: Path, dtype: torch.dtype, vocab: int):
    """The model at `dtype` (both sides score this same object), its vocabulary padded to `vocab`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True).eval()
    if vocab > model.config.vocab_size:
        torch.manual_seed(0)
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="a real model dir (default: tiny random Llama)"
    )
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--settings",
        default="best,equal",
        help="comma-separated: best (bf16 where the CPU has it natively, both sides), equal (both fp32)",
    )
    parser.add_argument(
        "--options",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time option-text log-likelihood on both sides (5 rows per question: slow on real models)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=4096,
        help="tiny model's vocabulary (>= the tiny tokenizer's 4096; the extra rows cost lm_head work as in "
        "real models with 32k-262k vocabularies, though the tokenizer never produces them)",
    )
    add_threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from medtune.model.cpu_caps import cpu_flags, native_bf16

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "m", "llama", **MODEL)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        template = "plain" if args.model is None else "auto"
        items = build_items(load_records(args.items), tokenizer, FormatConfig(template=template))
        results, n_params, vocab = {}, 0, 0
        for setting in args.settings.split(","):
            model = load_model(model_dir, compute_dtype(setting), args.vocab)
            n_params, vocab = sum(p.numel() for p in model.parameters()), model.config.vocab_size
            results[setting] = measure(model, tokenizer, items, args)
            del model
    bf16_vs_fp32 = against_fp32(results)
    model_name = args.model.name if args.model else "tiny random Llama"
    flags = native_bf16(cpu_flags())
    machine = (
        f"{cpu_name()}, {os.cpu_count()} CPUs (shared with other jobs), native bf16 flags: "
        f"{', '.join(flags) or 'none'}, torch {torch.__version__} threads={torch.get_num_threads()}"
    )
    load_end = os.getloadavg()
    n = len(items)
    print(
        f"{n} questions (MedQA dev + KorMedMCQA valid), template {template}, batch size {args.batch_size}, "
        f"{model_name} {n_params / 1e6:.1f}M params, vocab {vocab}, best of {args.repeats}"
    )
    for setting, r in results.items():
        print(f"-- {setting} settings ({r['dtype']} on both sides)")
        print(f"{'system':32s} {'seconds':>8s} {'q/s':>8s}")
        for row in r["rows"]:
            print(f"{row['system']:32s} {row['seconds']:8.2f} {row['q_per_s']:8.2f}")
        for k, v in r["ratios"].items():
            print(f"{k:32s} {v:6.2f}x")
        print(
            f"letter predictions agreeing with lm-eval's: {r['prediction_agreement']:.3f} "
            f"(max |letter log-prob diff| {r['max_abs_letter_logprob_diff']:.2e})"
        )
    if bf16_vs_fp32:
        print(
            "bf16 predictions agreeing with fp32 ones: "
            + ", ".join(f"{k} {v:.3f}" for k, v in bf16_vs_fp32.items())
        )
    loads = " ".join(f"{x:.2f}" for x in load_start), " ".join(f"{x:.2f}" for x in load_end)
    print(f"machine: {machine}; load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "eval_throughput",
        "items": n,
        "template": template,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "model": {"name": model_name, "params": n_params, "vocab": vocab}
        | ({} if args.model else {"arch": "llama", **MODEL}),
        "settings": results,
        "bf16_predictions_agreeing_with_fp32": bf16_vs_fp32,
        "machine": machine,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "targets": {"letter_vs_lm_eval_letters": 1.5, "letter_vs_lm_eval_options": 4.0},
    }
    if args.model:
        name = f"eval_throughput_{args.model.name}.json"
    else:
        name = "eval_throughput.json" if args.vocab <= 4096 else f"eval_throughput_vocab{args.vocab}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    return 0


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's machine string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
