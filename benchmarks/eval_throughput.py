"""Questions per second: medtune's scorer vs lm-evaluation-harness on the same model and items.

Two comparisons, measured in one process on the same CPU threads, the systems taking turns in each
of `--repeats` rounds (best time kept), after a short warm-up of both:

  (i)  same formulation on both sides: medtune letter mode (one forward per question, next-token
       log-probs of " A".." E") vs lm-eval `loglikelihood` of the continuations " A".." E"
       (lm-eval groups the five single-token requests that share a context into one forward).
       Target >= 1.5x.
  (ii) medtune letter mode vs lm-eval option-text log-likelihood (the usual harness MCQA task:
       one row per option). Target >= 4x.

Model: a random tiny Llama with hidden 256, 4 layers, 8 heads (about 5M parameters), so a forward
pass is real work and the timing is not only Python overhead; still, absolute numbers on a shared
CPU mean little, so the ratios are what to read. Both sides use the same batch size and threads.

Where (i)'s gain comes from: both sides run one forward per question, but lm-eval computes and
log-softmaxes logits at every position ([B, T, vocab]) while medtune asks for the last position
only (`logits_to_keep`), and runs the final decoder layer's MLP and attention output projection on
that position only (`score.final_layer_on_last_positions`). The lm_head part of the gain grows with
the vocabulary: `--vocab` pads the model's vocabulary (the tiny tokenizer has 4096 tokens; real small
models have 32k-262k) to show it; the final-layer part is about 1/(number of layers) of the
per-layer work, so it shrinks on deep models.

    python benchmarks/eval_throughput.py [--items 100] [--batch-size 8] [--repeats 2] [--vocab 4096]
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

from medtune.config import PackingConfig, SourceConfig  # noqa: E402
from medtune.data.read import iter_source  # noqa: E402
from medtune.evaluate import score as S  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--vocab",
        type=int,
        default=4096,
        help="model vocabulary (>= the tiny tokenizer's 4096; the extra rows cost lm_head work as in real "
        "models with 32k-262k vocabularies, though the tokenizer never produces them)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared, oversubscribed CPU more threads only contend)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "m", "llama", **MODEL)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.vocab > model.config.vocab_size:
        torch.manual_seed(0)
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
    n_params = sum(p.numel() for p in model.parameters())
    items = S.build_items(load_records(args.items), tokenizer, PackingConfig(template="plain"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")

    def harness(pairs):
        reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        return lambda: lm.loglikelihood(reqs, disable_tqdm=True)

    letter_pairs = [(it["prompt"], t) for it in items for t in it["targets"]]
    option_pairs = [p for it in items for p in S.option_pairs(it)]
    # warm-up of both sides (allocator, kernels) on the first few questions
    S.score_items(model, tokenizer, items[:8], "letter", args.batch_size)
    harness(letter_pairs[: sum(len(it["targets"]) for it in items[:8])])()
    times = timed(
        {
            "ours": lambda: S.score_items(model, tokenizer, items, "letter", args.batch_size),
            "letters": harness(letter_pairs),
            "options": harness(option_pairs),
        },
        args.repeats,
    )
    (t_ours, ours), (t_letters, theirs), (t_options, _) = times["ours"], times["letters"], times["options"]
    ours_loglik = {"ll": lambda: S.score_items(model, tokenizer, items, "loglik", args.batch_size)}
    t_ours_ll = timed(ours_loglik, 1)["ll"][0]

    # same formulation -> same decisions: check the predicted letters agree with lm-eval's
    preds_theirs, start = [], 0
    for it in items:
        lls = [ll for ll, _ in theirs[start : start + len(it["targets"])]]
        start += len(it["targets"])
        preds_theirs.append("ABCDE"[lls.index(max(lls))])
    agree = sum(o["predicted"] == p for o, p in zip(ours, preds_theirs, strict=True)) / len(items)

    n = len(items)
    rows = [
        {"system": "medtune letter", "seconds": t_ours, "q_per_s": n / t_ours},
        {"system": "lm-eval loglik ' A'..' E'", "seconds": t_letters, "q_per_s": n / t_letters},
        {"system": "lm-eval loglik option text", "seconds": t_options, "q_per_s": n / t_options},
        {"system": "medtune loglik option text", "seconds": t_ours_ll, "q_per_s": n / t_ours_ll},
    ]
    ratios = {
        "letter_vs_lm_eval_letters": t_letters / t_ours,
        "letter_vs_lm_eval_options": t_options / t_ours,
        "loglik_vs_lm_eval_options": t_options / t_ours_ll,
    }
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPUs (shared with other jobs), "
        f"torch {torch.__version__} threads={torch.get_num_threads()}"
    )
    print(
        f"{n} questions (MedQA dev + KorMedMCQA valid), batch size {args.batch_size}, "
        f"tiny Llama {n_params / 1e6:.1f}M params, best of {args.repeats}"
    )
    print(f"{'system':32s} {'seconds':>8s} {'q/s':>8s}")
    for r in rows:
        print(f"{r['system']:32s} {r['seconds']:8.2f} {r['q_per_s']:8.2f}")
    for k, v in ratios.items():
        print(f"{k:32s} {v:6.2f}x")
    print(f"letter predictions agreeing with lm-eval's: {agree:.3f}\nmachine: {machine}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "eval_throughput",
        "items": n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "model": {"arch": "llama", "params": n_params, "vocab": model.config.vocab_size, **MODEL},
        "rows": rows,
        "ratios": ratios,
        "prediction_agreement_same_formulation": agree,
        "machine": machine,
        "targets": {"letter_vs_lm_eval_letters": 1.5, "letter_vs_lm_eval_options": 4.0},
    }
    path = RESULTS / (
        "eval_throughput.json" if args.vocab <= 4096 else f"eval_throughput_vocab{args.vocab}.json"
    )
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
