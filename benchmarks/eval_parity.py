"""Parity: medtune's option log-likelihood (acc, acc_norm) equals lm-evaluation-harness's.

Same model, same items, same (context, continuation) pairs: the prompts come from
`medtune.format.render_prompt` and the continuations from `medtune.evaluate.score.option_pairs`;
lm-eval scores them with `HFLM.loglikelihood` (its own tokenisation, batching and log-softmax), and
acc / acc_norm are taken from both sets of log-likelihoods with the harness's formula
(`argmax(lls)`, `argmax(lls / len(choice))`, from `lm_eval.api.task.ConfigurableTask.process_results`).

Data: the shared MedQA dev (English, 4 options) and KorMedMCQA valid (Korean, 5 options), the first
N items of each. Model: a random-weight tiny Llama (`build_tiny_model`), so accuracies are near
chance; what must match is every log-likelihood and every prediction, not the accuracy level.

    python benchmarks/eval_parity.py [--items 200] [--template plain|chat]

Needs `pip install lm-eval==0.4.13` (not a medtune dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import add_threads_option  # noqa: E402

from medtune.config import FormatConfig, SourceConfig  # noqa: E402
from medtune.data.read import iter_source  # noqa: E402
from medtune.evaluate import score as S  # noqa: E402
from medtune.evaluate.prompts import build_items  # noqa: E402
from medtune.model.tiny import build_tiny_model  # noqa: E402

DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", "/work/shared/data"))
RESULTS = Path(__file__).resolve().parent / "results"


def load_items(n: int) -> list[dict]:
    """The first n valid MCQA records of MedQA dev and of KorMedMCQA valid (all four professions)."""
    sources = [
        SourceConfig(path=DATA / "medqa" / "phrases_no_exclude_dev.jsonl", format="medqa", name="medqa"),
        SourceConfig(path=DATA / "kormedmcqa", format="kormedmcqa", name="kormedmcqa", split="valid"),
    ]
    records = []
    for src in sources:
        got = [r for r in iter_source(src, "eval") if isinstance(r, dict) and r.get("kind") == "mcqa"]
        if src.name == "kormedmcqa":  # interleave professions so 200 items are not all doctor
            got = [r for _, r in sorted(enumerate(got), key=lambda ir: (ir[0] % 50, ir[0]))]
        records += got[:n]
    return records


def harness_loglik(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    """Log-likelihoods from lm-eval's HFLM on the exact same (context, continuation) pairs."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    return [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def accuracies(items: list[dict], flat: list[float]) -> tuple[list[int], list[int], float, float]:
    """Per-item argmax predictions (raw, per-character) and acc / acc_norm, the harness's way."""
    preds, preds_norm, start = [], [], 0
    for item in items:
        options = item["record"]["options"]
        lls = np.array(flat[start : start + len(options)])
        start += len(options)
        preds.append(int(np.argmax(lls)))
        preds_norm.append(int(np.argmax(lls / np.array([float(len(o)) for o in options]))))
    gold = ["ABCDE".index(it["record"]["answer"]) for it in items]
    acc = float(np.mean([p == g for p, g in zip(preds, gold, strict=True)]))
    acc_norm = float(np.mean([p == g for p, g in zip(preds_norm, gold, strict=True)]))
    return preds, preds_norm, acc, acc_norm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200, help="items per dataset")
    parser.add_argument("--template", choices=["plain", "chat"], default="plain")
    parser.add_argument("--batch-size", type=int, default=8)
    add_threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", "llama")
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_items(args.items)
    items = build_items(records, tokenizer, FormatConfig(template=args.template))
    rows = []
    for name in ("medqa", "kormedmcqa"):
        subset = [it for it in items if it["record"]["source"] == name]
        pairs = [p for it in subset for p in S.option_pairs(it)]
        t0 = time.perf_counter()
        ours = S.loglik_scores(model, tokenizer, pairs, args.batch_size)
        t1 = time.perf_counter()
        theirs = harness_loglik(model, tokenizer, pairs, args.batch_size)
        t2 = time.perf_counter()
        p_ours, pn_ours, acc_o, accn_o = accuracies(subset, ours)
        p_theirs, pn_theirs, acc_t, accn_t = accuracies(subset, theirs)
        rows.append(
            {
                "dataset": name,
                "items": len(subset),
                "pairs": len(pairs),
                "acc_medtune": acc_o,
                "acc_lm_eval": acc_t,
                "acc_norm_medtune": accn_o,
                "acc_norm_lm_eval": accn_t,
                "max_abs_loglik_diff": float(np.max(np.abs(np.array(ours) - np.array(theirs)))),
                "pred_disagreements": int(sum(a != b for a, b in zip(p_ours, p_theirs, strict=True))),
                "pred_norm_disagreements": int(sum(a != b for a, b in zip(pn_ours, pn_theirs, strict=True))),
                "seconds_medtune": round(t1 - t0, 2),
                "seconds_lm_eval": round(t2 - t1, 2),
            }
        )
    print_table(rows)
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPUs (shared with other jobs), torch {torch.__version__}, "
        f"threads={torch.get_num_threads()}"
    )
    out = {
        "benchmark": "eval_parity",
        "template": args.template,
        "batch_size": args.batch_size,
        "model": "tiny random Llama (hidden 64, 2 layers, vocab 4096)",
        "machine": machine,
        "lm_eval_version": _version("lm_eval"),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"eval_parity_{args.template}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"machine: {machine}\nwrote {path}")
    ok = all(r["pred_disagreements"] == 0 and r["max_abs_loglik_diff"] < 1e-3 for r in rows)
    return 0 if ok else 1


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def print_table(rows: list[dict]) -> None:
    cols = [
        "dataset",
        "items",
        "pairs",
        "acc_medtune",
        "acc_lm_eval",
        "acc_norm_medtune",
        "acc_norm_lm_eval",
        "max_abs_loglik_diff",
        "pred_disagreements",
        "pred_norm_disagreements",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    sys.exit(main())
