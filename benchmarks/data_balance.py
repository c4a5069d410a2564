"""The paper's second finding in miniature: does the ko:en mix of the fine-tuning data move each language?

Gemma 3 270M (real weights) is QLoRA-tuned on the same token budget in every cell, with Korean:English
mixed by tokens at 1:0, 1:1 and 3:10 (the paper's English-heavy en:ko 10:3). Korean training text is
KorMedMCQA train and GenMedGPT-ko; English is MedMCQA, PubMedQA and GenMedGPT-en. The base model and every
cell are scored on the same held-out items:

- primary: per-language NLL of held-out text (nats per token, averaged over items): GenMedGPT dialogues
  no cell trained on, in Korean and in English (the same dialogues, held out by row in both languages;
  the doctor's reply given the patient's message), and the question + options + answer text of the
  eval sources (KorMedMCQA valid: its whole medical-law block plus a sample of other items; MedQA dev).
  Every model scores the same items, so each difference between two models is paired per item and
  comes with a paired bootstrap 95% CI.
- secondary: letter-mode accuracy with Wilson CIs, McNemar against the 1:0 cell and against the base
  model, and the gold answer's NLL renormalised over the option letters.

Everything runs through medtune itself: this script writes one config and runs `medtune sweep`'s
`run_sweep` (prepare -> train -> eval per cell, base scored once; resumable). The eval has
`eval.nll: true`, so each model's held-out NLL is scored by `medtune.evaluate.nll` through the training
loss's own forward, template and labels; this script only pairs the models' per-item files.
Item counts are small because every model's scoring costs CPU minutes; the paired design is what
makes them enough.

    python benchmarks/data_balance.py --budget 4000 --ratios 1:0,3:10 --max-items 20 \
        --out runs/data_balance_pilot --results benchmarks/results/data_balance_pilot.json  # pilot
    python benchmarks/data_balance.py                                              # the experiment
    python benchmarks/data_balance.py --seeds 0,1   # two seeds per ratio; finished cells in --out are reused
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medtune.data.read import is_medical_law
from medtune.evaluate.compare import compare_predictions, load_predictions
from medtune.evaluate.nll import compare_nll, nll_table, paired_delta, read_nll
from medtune.evaluate.stats import wilson_ci
from medtune.evaluate.sweep_advice import advice_lines
from medtune.sweep import cell_name, parse_ratios, run_sweep

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "data_balance.json"
GENMEDGPT_ALIGNED = 2500
"""GenMedGPT's ko CSV and en JSON are row-aligned up to here (en item 2501 has no Korean twin)."""
BOOTSTRAP = 2000


def make_splits(data_dir: Path, out: Path, n_heldout: int, seed: int) -> dict[str, Path]:
    """Hold out the same `n_heldout` GenMedGPT dialogues in both languages; write train and held-out files."""
    src = data_dir / "genmedgpt_5k_ko_en"
    with (src / "GenMedGPT-5k-ko.csv").open(encoding="utf-8", newline="") as f:
        ko = list(csv.DictReader(f))
    en = json.loads((src / "chatdoctor5k.json").read_text(encoding="utf-8"))
    held = set(random.Random(seed).sample(range(GENMEDGPT_ALIGNED), n_heldout))
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, keep in (("train", lambda i: i not in held), ("heldout", lambda i: i in held)):
        paths[f"ko_{part}"] = out / f"genmedgpt_ko_{part}.csv"
        with paths[f"ko_{part}"].open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["input", "output"])
            writer.writeheader()
            writer.writerows(row for i, row in enumerate(ko) if keep(i))
        paths[f"en_{part}"] = out / f"genmedgpt_en_{part}.json"
        paths[f"en_{part}"].write_text(
            json.dumps([item for i, item in enumerate(en) if keep(i)], ensure_ascii=False), encoding="utf-8"
        )
    return paths


def make_kormedmcqa_subset(data_dir: Path, out: Path, n_other: int, seed: int) -> Path:
    """KorMedMCQA valid in its own layout, cut to the whole medical-law block plus `n_other` other items.

    The law block is the paper's headline group, so all of it is kept; the other items are a seeded
    sample across the four professions (CPU time per model is what limits the item count here).
    """
    rows: dict[str, list[dict]] = {}
    fields: dict[str, list[str]] = {}
    for folder in sorted(p for p in (data_dir / "kormedmcqa").iterdir() if p.is_dir()):
        with (folder / "valid.csv").open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields[folder.name], rows[folder.name] = list(reader.fieldnames or []), list(reader)
    others = [(prof, i) for prof, rs in rows.items() for i, r in enumerate(rs) if not is_medical_law(r)]
    chosen = set(random.Random(seed).sample(others, min(n_other, len(others))))
    for prof, rs in rows.items():
        (out / prof).mkdir(parents=True, exist_ok=True)
        with (out / prof / "valid.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields[prof])
            writer.writeheader()
            writer.writerows(r for i, r in enumerate(rs) if is_medical_law(r) or (prof, i) in chosen)
    return out


def write_config(args: argparse.Namespace, splits: dict[str, Path], path: Path) -> Path:
    """The one medtune config every cell shares; the sweep changes only data.mix.ratio."""
    data = args.data.resolve()
    cfg = {
        "seed": args.seed,
        "data": {
            "train": [
                {"path": str(data / "kormedmcqa"), "format": "kormedmcqa", "split": "train"},
                {
                    "path": str(splits["ko_train"]),
                    "format": "genmedgpt",
                    "name": "genmedgpt_ko",
                    "split": "train",
                },
                {"path": str(data / "medmcqa" / "validation.jsonl"), "format": "medmcqa", "name": "medmcqa"},
                {"path": str(data / "pubmedqa"), "format": "pubmedqa", "split": "train"},
                {
                    "path": str(splits["en_train"]),
                    "format": "genmedgpt",
                    "name": "genmedgpt_en",
                    "split": "train",
                },
            ],
            "eval": [
                {"path": str(splits["kormedmcqa_valid"]), "format": "kormedmcqa", "split": "valid"},
                {
                    "path": str(data / "medqa" / "phrases_no_exclude_dev.jsonl"),
                    "format": "medqa",
                    "name": "medqa",
                    "limit": args.medqa_items,
                },
                {
                    "path": str(splits["ko_heldout"]),
                    "format": "genmedgpt",
                    "name": "heldout_ko",
                    "split": "heldout",
                },
                {
                    "path": str(splits["en_heldout"]),
                    "format": "genmedgpt",
                    "name": "heldout_en",
                    "split": "heldout",
                },
            ],
            "mix": {"ratio": {"ko": 1, "en": 1}, "by": "tokens", "total": args.budget},
            # GenMedGPT's English prompts open with the same templated phrases, so 13-gram matching
            # would drop ~60% of English dialogues (and no Korean ones) for sharing boilerplate with
            # the held-out prompts. The dialogues are held out by row in both languages instead;
            # prepare still counts and reports every 13-gram match.
            "contamination": {"action": "report"},
        },
        "model": {"path": str(args.model.resolve())},
        "quantization": {"mode": "nf4"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "packing": {"mode": "packed", "max_seq_len": 1024},
        "train": {
            "epochs": 1,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "lr": args.lr,
            "warmup_steps": 2,
            "scheduler": "cosine",
            "gradient_checkpointing": False,  # 24 GiB of RAM is plenty for 1024 tokens; ~1.3x faster
            "save_every": 10,
        },
        "eval": {
            "mode": "letter",
            "batch_size": 8,
            "bootstrap_samples": BOOTSTRAP,
            "nll": True,  # the primary measure: held-out NLL of every eval record, same loaded model
            "nll_scope": "text",  # MCQA items whole (their target is one letter), dialogues' replies
            "max_items": args.max_items,
        },
        "output": {"dir": str(args.out.resolve() / "run")},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ---------------------------------------------------------------- held-out NLL (primary)

NLL_KEYS = ("language", "source", "tag")


def nll_comparison(scored: dict[str, list[dict]], reference: str) -> dict[str, Any]:
    """Per group: each model's mean NLL/token; each model's paired delta vs `reference` and vs base."""
    ids = [r["id"] for r in scored["base"]]
    for label, rows in scored.items():
        if [r["id"] for r in rows] != ids:
            raise SystemExit(f"{label}: held-out items differ from the base model's; use a fresh --out")
    table: dict[str, Any] = {}
    for label, rows in scored.items():
        for group, g in nll_table(rows, NLL_KEYS, BOOTSTRAP, 0).items():
            table.setdefault(group, {"n": g["n"], "mean": {}})["mean"][label] = g["nll"]
    for against in dict.fromkeys(["base", reference]):
        for label, rows in scored.items():
            if label != against:
                for group, d in compare_nll(scored[against], rows, NLL_KEYS, BOOTSTRAP, 0).items():
                    table[group].setdefault(f"vs_{against}", {})[label] = d
    return dict(sorted(table.items()))


# ---------------------------------------------------------------- MCQA (secondary)


def renormalised_gold_nll(pred: dict) -> float | None:
    """-log p(gold letter) with the softmax taken over the option letters only."""
    scores, gold = pred.get("scores"), pred.get("gold")
    if not scores or gold is None or pred.get("correct") is None:
        return None
    s = np.asarray(scores, dtype=np.float64)
    return float(np.logaddexp.reduce(s) - s["ABCDEFGHIJ".index(gold)])


def mcqa_table(preds: dict[str, dict[str, dict]], reference: str) -> dict[str, Any]:
    """Accuracy with Wilson CI per group and model; McNemar vs the reference cell and vs base."""
    table: dict[str, Any] = {}
    for label, by_id in preds.items():
        for against in dict.fromkeys(["base", reference]):
            if label == against:
                continue
            for group, g in compare_predictions(preds[against], by_id, BOOTSTRAP, 0)["groups"].items():
                row = table.setdefault(group, {"n": g["n"], "acc": {}, "vs_base": {}, f"vs_{reference}": {}})
                row["acc"][against] = g["acc_a"]
                row["acc"][label] = g["acc_b"]
                row[f"vs_{against}"][label] = {
                    k: g[k] for k in ("delta_pp", "ci95_pp", "mcnemar_p", "significant")
                }
    for row in table.values():
        row["wilson95"] = {k: list(wilson_ci(round(a * row["n"]), row["n"])) for k, a in row["acc"].items()}
    return table


def gold_nll_table(preds: dict[str, dict[str, dict]], reference: str) -> dict[str, Any]:
    """Option-renormalised gold NLL per language: means and paired deltas vs the reference and base."""
    ids = sorted(set.intersection(*(set(p) for p in preds.values())))
    table = {}
    for lang in sorted({preds["base"][i]["language"] for i in ids}):
        keep = [i for i in ids if preds["base"][i]["language"] == lang]
        vals = {k: [renormalised_gold_nll(p[i]) for i in keep] for k, p in preds.items()}
        ok = [j for j in range(len(keep)) if all(v[j] is not None for v in vals.values())]
        arr = {k: np.array([v[j] for j in ok]) for k, v in vals.items()}
        entry: dict[str, Any] = {"n": len(ok), "mean": {k: float(a.mean()) for k, a in arr.items()}}
        for against in dict.fromkeys(["base", reference]):
            entry[f"vs_{against}"] = {
                k: paired_delta(arr[against], a, BOOTSTRAP, 0) for k, a in arr.items() if k != against
            }
        table[f"language={lang}"] = entry
    return table


# ---------------------------------------------------------------- report


def _delta_cell(d: dict[str, Any]) -> str:
    """`+0.050 [+0.010, +0.090]`, bold where the paired CI excludes 0."""
    lo, hi = d["ci95"]
    mark = "**" if d["significant"] else ""
    return f"{mark}{d['delta']:+.3f}{mark} [{lo:+.3f}, {hi:+.3f}]"


def _mean_delta_table(title: str, table: dict[str, Any], labels: list[str], ref: str, unit: str) -> list[str]:
    """A means-and-paired-deltas table: each model's mean, each cell vs `ref`, each model vs base."""
    cells = [m for m in labels if m not in ("base", ref)]
    head = [
        "group",
        "n",
        *[f"{m}{unit}" for m in labels],
        *[f"{c} − {ref}" for c in cells],
        *[f"{m} − base" for m in labels if m != "base"],
    ]
    out = ["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, e in table.items():
        row = [group, str(e["n"]), *[f"{e['mean'][m]:.3f}" for m in labels]]
        row += [_delta_cell(e[f"vs_{ref}"][c]) for c in cells]
        row += [_delta_cell(e["vs_base"][m]) for m in labels if m != "base"]
        out.append("| " + " | ".join(row) + " |")
    return out


def markdown(result: dict[str, Any]) -> str:
    ref, labels = result["reference"], result["models"]
    cells = [m for m in labels if m not in ("base", ref)]
    out = _mean_delta_table(
        "Held-out text NLL (nats/token, mean over items; deltas with paired bootstrap 95% CI, "
        "**bold** where the CI excludes 0):",
        result["nll"],
        labels,
        ref,
        " NLL",
    )[1:]
    head = [
        "group",
        "n",
        *[f"{m} acc [Wilson 95%]" for m in labels],
        *[f"{c} − {ref} pp (McNemar p)" for c in cells],
        *[f"{m} − base pp (p)" for m in labels if m != "base"],
    ]
    out += ["", "Letter-mode accuracy:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, e in result["mcqa"].items():
        if not (group == "all" or group.startswith(("language=", "source=", "tag="))):
            continue
        row = [group, str(e["n"])]
        row += [
            f"{100 * e['acc'][m]:.1f} [{100 * e['wilson95'][m][0]:.1f}, {100 * e['wilson95'][m][1]:.1f}]"
            for m in labels
        ]
        row += [
            f"{e[f'vs_{ref}'][c]['delta_pp']:+.1f} (p={e[f'vs_{ref}'][c]['mcnemar_p']:.2g})" for c in cells
        ]
        row += [
            f"{e['vs_base'][m]['delta_pp']:+.1f} (p={e['vs_base'][m]['mcnemar_p']:.2g})"
            for m in labels
            if m != "base"
        ]
        out.append("| " + " | ".join(row) + " |")
    out += _mean_delta_table(
        "Gold-letter NLL renormalised over the options:", result["gold_nll"], labels, ref, ""
    )
    return "\n".join(out) + "\n"


def cell_summary(cell_dir: Path) -> dict[str, Any]:
    """What a cell trained on (steps, real tokens, language shares) and for how long, from its manifests."""
    train = json.loads((cell_dir / "train" / "run.json").read_text(encoding="utf-8"))
    prep = json.loads((cell_dir / "prepare" / "run.json").read_text(encoding="utf-8"))
    results, mix = train["results"], prep["results"]["mix"]
    return {
        "steps": results["steps"],
        "real_tokens": results["packing"]["real_tokens"],
        "truncated_tokens": results["packing"]["truncated_tokens"],
        "final_loss": results["final_loss"],
        "token_share": mix["achieved_share"],
        "train_s": round(train["seconds"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "gemma3-270m")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "data_balance")
    parser.add_argument(
        "--budget", type=int, default=16_000, help="training tokens per cell (data.mix.total)"
    )
    parser.add_argument("--ratios", default="1:0,1:1,3:10", help="ko:en shares; the first is the reference")
    parser.add_argument("--heldout", type=int, default=40, help="GenMedGPT dialogues held out per language")
    parser.add_argument(
        "--kormedmcqa-other", type=int, default=20, help="KorMedMCQA valid items beside the law block"
    )
    parser.add_argument("--medqa-items", type=int, default=40)
    parser.add_argument("--max-items", type=int, default=None, help="eval items per source (pilot: 20)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        default=None,
        help="training seeds per ratio, e.g. 1,2 (default: --seed); the tables "
        "below use the first, the seed-aware intervals and the recommendation use all",
    )
    parser.add_argument("--target", default="source=heldout_ko", help="group the recommendation optimises")
    parser.add_argument("--protect", action="append", default=None, help="default: source=heldout_en")
    parser.add_argument("--margin", type=float, default=0.0, help="allowed harm on --protect (nats/token)")
    parser.add_argument("--metric", choices=("nll", "accuracy"), default="nll")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no model there; run `medtune model fetch gemma3-270m` first")
    args.out = args.out.resolve()
    started = time.monotonic()
    torch.manual_seed(args.seed)
    splits = make_splits(args.data, args.out / "splits", args.heldout, args.seed)
    splits["kormedmcqa_valid"] = make_kormedmcqa_subset(
        args.data, args.out / "splits" / "kormedmcqa", args.kormedmcqa_other, args.seed
    )
    cfg_path = write_config(args, splits, args.out / "data_balance.yaml")
    ratios = parse_ratios(f"ko:en={args.ratios}")
    sweep_dir = args.out / "sweep"
    seeds = [int(s) for s in (args.seeds or str(args.seed)).split(",")]
    advisor = {"target": args.target, "protect": args.protect or ["source=heldout_en"], "margin": args.margin}
    overrides = {f"sweep.{k}": v for k, v in (advisor | {"metric": args.metric}).items()}
    sweep = run_sweep(cfg_path, ratios, seeds, sweep_dir, overrides)  # prints the seed-aware advice too
    failed = [c for c in sweep["cells"] if c.get("status") not in ("ok", "skipped")]
    if sweep["base"].get("status") == "failed" or failed:
        raise SystemExit(f"sweep did not finish: base {sweep['base'].get('error')}, cells {failed}")
    sweep_s = time.monotonic() - started

    names = {cell_name(r, seeds[0]): r for r in ratios}
    reference = next(iter(names))
    scored = {"base": read_nll(sweep_dir / "base" / "eval" / "base" / "nll.jsonl")}
    preds = {"base": load_predictions(sweep_dir / "base" / "eval" / "base" / "predictions.jsonl")}
    for name in names:
        cell = sweep_dir / "cells" / name
        scored[name] = read_nll(cell / "eval" / "tuned" / "nll.jsonl")
        preds[name] = load_predictions(cell / "eval" / "tuned" / "predictions.jsonl")
    result = {
        "benchmark": "data_balance",
        "command": "python benchmarks/data_balance.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (
                ("budget", args.budget),
                ("ratios", args.ratios),
                ("heldout", args.heldout),
                ("kormedmcqa_other", args.kormedmcqa_other),
                ("medqa_items", args.medqa_items),
                ("max_items", args.max_items),
                ("lr", args.lr),
                ("seed", args.seed),
                ("seeds", ",".join(map(str, seeds))),
                ("target", args.target),
                ("margin", args.margin),
                ("metric", args.metric),
            )
        ),
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": str(args.model),
        "budget_tokens": args.budget,
        "reference": reference,
        "models": list(scored),
        "cells": {name: cell_summary(sweep_dir / "cells" / name) for name in names},
        "nll": nll_comparison(scored, reference),
        "mcqa": mcqa_table(preds, reference),
        "gold_nll": gold_nll_table(preds, reference),
        "seeds": seeds,
        "advice": sweep["advice"],  # over every seed: intervals cover items and seeds
        "wall_s": {"sweep": round(sweep_s), "total": round(time.monotonic() - started)},
    }
    text = markdown(result) + "\nOver all seeds (tables above: seed " + f"{seeds[0]}):\n"
    text += "\n".join(advice_lines(sweep["advice"])) + "\n"
    print(text)
    (args.out / "data_balance.md").write_text(text, encoding="utf-8")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    minutes = math.ceil(result["wall_s"]["total"] / 60)
    print(f"wrote {args.results} and {args.out / 'data_balance.md'} in {minutes} min")


if __name__ == "__main__":
    main()
