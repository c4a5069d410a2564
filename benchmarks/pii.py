"""PII scrubber recall and precision per type on the labelled cases in benchmarks/pii_cases.jsonl.

Each case is {"lang", "text", "pii": [{"type", "text"}]}; near-miss negatives (doses, pressures,
ranges, years, karyotypes, question numbers) have an empty `pii` list. Cases marked `heldout` were
written after the rules were frozen and are also reported on their own; the rest were used while
writing the rules, so their scores are in-sample. A predicted span counts as
a true positive only when type and exact text match a labelled span.

    python benchmarks/pii.py            # prints the table, writes benchmarks/results/pii.json
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path

from medtune.data.pii import PII_TYPES, find_pii

HERE = Path(__file__).resolve().parent
CASES = HERE / "pii_cases.jsonl"
TARGET_RECALL, TARGET_PRECISION = 0.99, 0.95


def score_cases(path: Path = CASES, heldout_only: bool = False) -> dict:
    """Per-type true/false positives and false negatives, with recall and precision."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    errors = []
    cases = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if heldout_only:
        cases = [c for c in cases if c.get("heldout")]
    for case in cases:
        gold = Counter((s["type"], s["text"]) for s in case["pii"])
        pred = Counter((f.kind, f.text) for f in find_pii(case["text"]))
        for key in gold | pred:
            hit = min(gold[key], pred[key])
            tp[key[0]] += hit
            fp[key[0]] += pred[key] - hit
            fn[key[0]] += gold[key] - hit
            if pred[key] != gold[key]:
                errors.append(
                    {
                        "text": case["text"],
                        "type": key[0],
                        "span": key[1],
                        "error": "false positive" if pred[key] > gold[key] else "missed",
                    }
                )
    per_type = {}
    for t in PII_TYPES:
        per_type[t] = {
            "tp": tp[t],
            "fp": fp[t],
            "fn": fn[t],
            "recall": tp[t] / (tp[t] + fn[t]) if tp[t] + fn[t] else 1.0,
            "precision": tp[t] / (tp[t] + fp[t]) if tp[t] + fp[t] else 1.0,
        }
    n_pos = sum(1 for c in cases if c["pii"])
    return {
        "cases": len(cases),
        "positive_cases": n_pos,
        "negative_cases": len(cases) - n_pos,
        "labelled_spans": sum(len(c["pii"]) for c in cases),
        "per_type": per_type,
        "errors": errors,
    }


def main() -> None:
    result = score_cases()
    print(
        f"PII scrubber on {result['cases']} cases ({result['positive_cases']} with PII, "
        f"{result['negative_cases']} near-miss negatives), {platform.machine()} {platform.python_version()}"
    )
    print(f"{'type':<6} {'tp':>4} {'fp':>4} {'fn':>4} {'recall':>7} {'precision':>9}")
    for t, m in result["per_type"].items():
        print(f"{t:<6} {m['tp']:>4} {m['fp']:>4} {m['fn']:>4} {m['recall']:>7.3f} {m['precision']:>9.3f}")
    for e in result["errors"]:
        print(f"  {e['error']}: {e['type']} {e['span']!r} in {e['text']!r}")
    held = score_cases(heldout_only=True)
    print(f"held-out subset ({held['cases']} cases written after the rules were frozen):")
    for t, m in held["per_type"].items():
        print(f"  {t:<6} tp {m['tp']:>3} fp {m['fp']:>3} fn {m['fn']:>3}")
    result["heldout"] = {t: {k: m[k] for k in ("tp", "fp", "fn")} for t, m in held["per_type"].items()}
    ok = all(
        m["recall"] >= TARGET_RECALL and m["precision"] >= TARGET_PRECISION
        for m in result["per_type"].values()
    )
    print(f"targets recall >= {TARGET_RECALL}, precision >= {TARGET_PRECISION}: {'met' if ok else 'NOT met'}")
    result["targets_met"] = ok
    out = HERE / "results" / "pii.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
