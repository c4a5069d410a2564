"""Sample the training set to a target language ratio, by examples or by tokens, seeded.

Works on compact per-record arrays (language, stratum, weight), never on the records, so a
million candidates cost a few tens of MB. Within each language the budget is split over strata
(source or subject) in proportion to their size, so the mix keeps the shape of each language's data.
By tokens, each stratum is filled greedily in a seeded random order, skipping any record that
would overshoot its target; the per-language token totals then land within one record of their
targets, which puts the achieved ratio well inside 0.5% at realistic sizes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medtune.config import MixConfig
from medtune.errors import DataError


@dataclass
class MixResult:
    indices: list[int]
    """Chosen candidate indices, ascending; an index repeats when up-sampled."""
    target_share: dict[str, float] = field(default_factory=dict)
    achieved_share: dict[str, float] = field(default_factory=dict)
    weight_per_language: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    """Candidates left out because their language has no share in the ratio."""
    total_reduced: bool = False
    """True when `total` asked for more than the data allows without replacement."""


def _largest_remainder(total: int, weights: dict[str, float], caps: dict[str, int] | None) -> dict[str, int]:
    """Integers proportional to `weights` summing to `total` (or to the caps, when they bind)."""
    wsum = sum(weights.values()) or 1.0
    raw = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    if caps:
        out = {k: min(v, caps[k]) for k, v in out.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - int(raw[k])), k)):
        if sum(out.values()) >= total:
            break
        if not caps or out[k] < caps[k]:
            out[k] += 1
    return out


def _pick_examples(members: np.ndarray, target: int, rng: np.random.Generator) -> list[int]:
    n = len(members)
    copies, rest = divmod(target, n) if n else (0, 0)
    chosen = list(np.tile(members, copies)) if copies else []
    chosen += list(members[rng.permutation(n)[:rest]])
    return [int(i) for i in chosen]


def _pick_tokens(
    members: np.ndarray, weights: np.ndarray, target: float, rng: np.random.Generator, replacement: bool
) -> list[int]:
    """Greedy fill: seeded random order, take what still fits under the target."""
    chosen: list[int] = []
    got = 0
    while True:
        before = got
        for i in members[rng.permutation(len(members))]:
            w = int(weights[i])
            if got + w <= target:
                chosen.append(int(i))
                got += w
        if not replacement or got == before:  # one pass, or a pass that added nothing: done
            return chosen


def plan_mix(
    languages: Sequence[str], strata: Sequence[str], weights: np.ndarray, cfg: MixConfig, seed: int
) -> MixResult:
    """Choose candidates so each language gets its share of the budget.

    `weights` is 1 per record (by examples) or each record's token count (by tokens).
    """
    weights = np.asarray(weights, dtype=np.int64)
    if not cfg.ratio:
        return _describe(list(range(len(languages))), languages, weights, {}, {})
    shares = {k: v / sum(cfg.ratio.values()) for k, v in cfg.ratio.items() if v > 0}
    by_lang: dict[str, list[int]] = defaultdict(list)
    excluded: dict[str, int] = defaultdict(int)
    for i, lang in enumerate(languages):
        if lang in shares:
            by_lang[lang].append(i)
        else:
            excluded[lang] += 1
    avail = {lang: int(weights[by_lang[lang]].sum()) for lang in shares}
    if any(a == 0 for a in avail.values()):
        missing = sorted(k for k, a in avail.items() if a == 0)
        raise DataError(f"data.mix.ratio: no training records in language(s) {missing} after filtering")
    most = min(avail[k] / s for k, s in shares.items())
    total = cfg.total if cfg.total is not None else int(most)
    reduced = False
    if not cfg.replacement and total > most:
        total, reduced = int(most), True
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    if cfg.by == "examples":
        lang_targets = _largest_remainder(total, shares, None if cfg.replacement else avail)
    else:
        lang_targets = {k: total * s for k, s in shares.items()}
    for lang in sorted(shares):
        chosen += _pick_language(np.array(by_lang[lang]), strata, weights, lang_targets[lang], cfg, rng)
    result = _describe(sorted(chosen), languages, weights, shares, dict(excluded))
    result.total_reduced = reduced
    return result


def _pick_language(
    members: np.ndarray,
    strata: Sequence[str],
    weights: np.ndarray,
    target: float,
    cfg: MixConfig,
    rng: np.random.Generator,
) -> list[int]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in members:
        groups[strata[i] if cfg.stratify_by != "none" else ""].append(int(i))
    sizes = {g: float(weights[idx].sum()) for g, idx in groups.items()}
    chosen: list[int] = []
    if cfg.by == "examples":
        caps = None if cfg.replacement else {g: len(v) for g, v in groups.items()}
        for g, t in sorted(_largest_remainder(int(target), sizes, caps).items()):
            chosen += _pick_examples(np.array(groups[g]), t, rng)
        return chosen
    # By tokens: fill strata in order, carrying each stratum's shortfall to the next one, so
    # the language total stays within one record of its target.
    wsum = sum(sizes.values())
    carried = 0.0
    for g in sorted(groups):
        goal = target * sizes[g] / wsum + carried
        picked = _pick_tokens(np.array(groups[g]), weights, goal, rng, cfg.replacement)
        chosen += picked
        carried = goal - float(weights[picked].sum()) if picked else goal
    return chosen


def _describe(
    chosen: list[int],
    languages: Sequence[str],
    weights: np.ndarray,
    shares: dict[str, float],
    excluded: dict[str, int],
) -> MixResult:
    per_lang: dict[str, int] = defaultdict(int)
    for i in chosen:
        per_lang[languages[i]] += int(weights[i])
    total = sum(per_lang.values()) or 1
    return MixResult(
        indices=chosen,
        target_share={k: round(v, 6) for k, v in sorted(shares.items())},
        achieved_share={k: round(v / total, 6) for k, v in sorted(per_lang.items())},
        weight_per_language=dict(sorted(per_lang.items())),
        excluded=dict(sorted(excluded.items())),
    )
