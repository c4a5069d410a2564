"""The forgetting guard: did fine-tuning cost a protected group more than the config allows?

Each rule of `eval.guard` names a group and the largest regression against the base model it allows.
A check fails only on evidence, never on a point estimate alone:
- accuracy: tuned - base is below -max_drop_pp *and* the exact McNemar test on the same items gives
  p < 0.05 (a 3-item drop on 20 items is noise, and is not a failure);
- held-out NLL: the whole paired bootstrap 95% CI of tuned - base (nats/token) lies above
  max_nll_increase.
A rule whose group has no scored items fails, because a guard that cannot look must not pass a model.
The verdict goes to eval/guard.json (and metrics.json); `medtune export` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.config import GuardRule
from medtune.errors import MedtuneError
from medtune.evaluate.compare import ALPHA, compare_pairs, paired_groups
from medtune.evaluate.nll import compare_nll

GUARD_FILE = "guard.json"


class GuardFailed(MedtuneError):
    """A model failed its forgetting guard; `medtune export --force` ships it anyway."""


def check_accuracy(
    rule: GuardRule, pairs: list[tuple[bool, bool]], n_samples: int, seed: int
) -> dict[str, Any]:
    """One accuracy rule on (base correct, tuned correct) pairs of its group."""
    c = compare_pairs(pairs, n_samples, seed)
    failed = c["delta_pp"] < -rule.allowed and c["mcnemar_p"] < ALPHA
    return {
        "n": c["n"],
        "delta": c["delta_pp"],
        "ci95": c["ci95_pp"],
        "p": c["mcnemar_p"],
        "passed": not failed,
        "why": (
            f"accuracy {c['delta_pp']:+.1f} pp vs base (McNemar p={c['mcnemar_p']:.3g}); allowed drop "
            f"{rule.allowed:g} pp"
        ),
    }


def check_nll(rule: GuardRule, delta: dict[str, Any]) -> dict[str, Any]:
    """One NLL rule on its group's paired tuned - base delta (`nll.paired_delta`)."""
    lo, hi = delta["ci95"]
    return {
        "n": delta["n"],
        "delta": delta["delta"],
        "ci95": [lo, hi],
        "p": None,
        "passed": not lo > rule.allowed,
        "why": (
            f"held-out NLL {delta['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] nats/token vs base; allowed "
            f"increase {rule.allowed:g}"
        ),
    }


def evaluate_guard(
    rules: list[GuardRule],
    base: dict[str, dict],
    tuned: dict[str, dict],
    base_nll: list[dict[str, Any]] | None,
    tuned_nll: list[dict[str, Any]] | None,
    keys: list[str],
    n_samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The verdict of every rule: predictions by id for accuracy, nll.jsonl rows for NLL."""
    acc_groups = paired_groups(base, tuned)
    nll_groups = compare_nll(base_nll, tuned_nll, keys, n_samples, seed) if base_nll and tuned_nll else {}
    checks = []
    for rule in rules:
        head = {"group": rule.group, "metric": rule.metric, "allowed": rule.allowed}
        if rule.metric == "accuracy" and acc_groups.get(rule.group):
            checks.append(head | check_accuracy(rule, acc_groups[rule.group], n_samples, seed))
        elif rule.metric == "nll" and rule.group in nll_groups:
            checks.append(head | check_nll(rule, nll_groups[rule.group]))
        else:
            known = ", ".join(acc_groups if rule.metric == "accuracy" else nll_groups) or "none"
            why = f"no scored {rule.metric} items in group {rule.group!r} (groups: {known})"
            checks.append(head | {"n": 0, "passed": False, "why": why})
    return {"passed": all(c["passed"] for c in checks), "alpha": ALPHA, "checks": checks}


def guard_lines(verdict: dict[str, Any]) -> list[str]:
    """The verdict in words: a headline, then one line per rule."""
    head = "forgetting guard: PASSED" if verdict["passed"] else "forgetting guard: FAILED"
    return [head] + [
        f"  {'ok  ' if c['passed'] else 'FAIL'} {c['group']}: {c['why']}" for c in verdict["checks"]
    ]


def read_guard(eval_dir: Path) -> dict[str, Any] | None:
    """eval/guard.json, or None when the eval ran without guard rules (or before guards existed)."""
    path = Path(eval_dir) / GUARD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedtuneError(f"{path}: not valid JSON ({exc.msg}); run `medtune eval` again") from None


def export_verdict(run_dir: Path, force: bool) -> dict[str, Any]:
    """What export.json records about the guard; GuardFailed when the model failed and not `force`."""
    verdict = read_guard(Path(run_dir) / "eval")
    if verdict is None:
        return {"status": "not checked", "forced": False}
    status = "passed" if verdict.get("passed") else "failed"
    if status == "failed" and not force:
        failed = [c["why"] for c in verdict.get("checks", []) if not c.get("passed")]
        raise GuardFailed(
            f"{Path(run_dir) / 'eval' / GUARD_FILE}: the model failed its forgetting guard ("
            + "; ".join(failed)
            + "); export it anyway with --force"
        )
    return {"status": status, "forced": status == "failed", "checks": verdict.get("checks", [])}
