"""Score multiple-choice questions with a causal LM: letter, option log-likelihood, or generation.

Three ways to ask a model which option is right, all from the same prompt the model was trained on
(`medtune.format.render_prompt`, with the answer cue at the end):

- **letter**: one forward pass per question; compare the next-token log-probabilities of the answer
  letters. Cheapest, and it is exactly the decision the fine-tuned model was trained to make.
- **loglik**: the summed log-probability of each option's *text* after the cue, lm-evaluation-harness
  style: `acc` takes the largest sum, `acc_norm` the largest sum per character of the option text.
  One row per option, so about k times the work of letter mode.
- **generate**: greedy decoding and a regex for the chosen letter; a reply with no recognisable
  answer is `unanswered` (reported, and counted as not correct).

Tokenisation. Letter mode reads exactly the tokens training put after the prompt (prompt and target
tokenised apart, as `medtune.format.tokenize_example` does). Option log-likelihood follows
lm-evaluation-harness `_encode_pair` instead: trailing whitespace of the prompt moves to the
continuation, `prompt + continuation` is encoded whole and split after the prompt's own token count,
so `acc`/`acc_norm` match the harness token for token. On the plain template the two agree.

Batching: rows are sorted by length (longest first, so an out-of-memory shows up on the first batch),
cut into batches of at most `batch_size` rows that pad no row by more than 5% of the batch's width,
and *left*-padded with explicit `position_ids`, so every continuation ends at the last position and
only the last few positions' logits are computed (`logits_to_keep`), never the full [B, T, vocab].
For the same reason the final decoder layer runs its feed-forward block and attention output
projection on those positions only (`final_layer_on_last_positions`): no later layer reads the other
positions, and on a small model the final MLP is about a fifth of the forward pass.
Results are written back in input order, so output bytes do not depend on the sort.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F

from medtune.data.schema import LETTERS, Record

Mode = Literal["letter", "loglik", "generate"]
Progress = Callable[[int], None]
# How many items are tokenised, scored and written together; within a chunk rows are length-sorted.
CHUNK_BATCHES = 16


class McqaItem(TypedDict):
    """One question ready to score: the record, its full prompt and the target text of every letter."""

    record: Record
    prompt: str
    """Everything before the answer (k-shot examples included), ending with the answer cue."""
    targets: list[str]
    """`render_target` of each option letter, e.g. [" A", " B", ...]: fixes the space convention."""


# --------------------------------------------------------------------------------------- prompts
def gold_is_valid(record: Record) -> bool:
    """True when the record has >= 2 options and its answer is one of their letters."""
    options = record.get("options") or []
    answer = record.get("answer")
    return len(options) >= 2 and isinstance(answer, str) and answer in LETTERS[: len(options)]


def build_items(
    records: Sequence[Record],
    tokenizer: Any,
    packing_cfg: Any,
    k_shot: int = 0,
    pool: Sequence[Record] = (),
    seed: int = 0,
) -> list[McqaItem]:
    """Render every record's prompt (with `k_shot` examples drawn from `pool`) and letter targets.

    Uses `medtune.format` so evaluation sees the very template training used. Targets are rendered
    without explanations: only the answer itself is scored.
    """
    from medtune.format import render_prompt, render_target

    target_cfg = packing_cfg.model_copy(update={"include_explanation": False})

    def target(record: Record, letter: str) -> str:
        return render_target({**record, "answer": letter, "explanation": None}, target_cfg, tokenizer)

    index = index_pool(pool) if k_shot > 0 else None
    items: list[McqaItem] = []
    for record in records:
        n_opt = max(len(record.get("options") or []), 2)
        targets = [target(record, L) for L in LETTERS[:n_opt]]
        shots = select_shots(record, index, k_shot, seed) if index is not None else []
        parts = [render_prompt(s, tokenizer, packing_cfg) + target(s, s["answer"]) + "\n\n" for s in shots]
        prompt = join_prompts([*parts, render_prompt(record, tokenizer, packing_cfg)], tokenizer)
        items.append({"record": record, "prompt": prompt, "targets": targets})
    return items


def join_prompts(parts: Sequence[str], tokenizer: Any) -> str:
    """Concatenate shot and question prompts, keeping only the first BOS a chat template writes."""
    bos = getattr(tokenizer, "bos_token", None)
    out = [parts[0]]
    for part in parts[1:]:
        out.append(part[len(bos) :] if bos and part.startswith(bos) else part)
    return "".join(out)


def index_pool(pool: Sequence[Record]) -> dict[str, dict[str, list[Record]]]:
    """Few-shot candidates with a valid gold answer, by source and by language, each sorted by id.

    Built once per eval so choosing shots is not a scan of the whole pool per question.
    """
    usable = sorted((r for r in pool if gold_is_valid(r)), key=lambda r: r["id"])
    index: dict[str, dict[str, list[Record]]] = {"source": {}, "language": {}, "all": {"": usable}}
    for r in usable:
        index["source"].setdefault(r["source"], []).append(r)
        index["language"].setdefault(r["language"], []).append(r)
    return index


def select_shots(record: Record, pool: Sequence[Record] | dict, k: int, seed: int) -> list[Record]:
    """k examples for `record`: same source if possible, else same language, else any; never itself.

    `pool` is a list of records or its `index_pool`. It must come from a split other than the eval
    split (the caller guarantees it); the item is also excluded by id and by identical question
    text, since KorMedMCQA's fewshot file repeats valid items. The draw is seeded per item id, so
    it does not depend on the eval set's order.
    """
    if k <= 0:
        return []
    index = pool if isinstance(pool, dict) else index_pool(pool)
    tiers = [
        index["source"].get(record["source"], []),
        index["language"].get(record["language"], []),
        index["all"][""],
    ]
    candidates: list[Record] = []
    for tier in tiers:
        candidates = [r for r in tier if r["id"] != record["id"] and r["question"] != record["question"]]
        if len(candidates) >= k:
            break
    if len(candidates) < k:
        raise ValueError(f"k_shot={k} but only {len(candidates)} few-shot examples are available")
    rng = torch.Generator().manual_seed(_stable_seed(record["id"], seed))
    picks = torch.randperm(len(candidates), generator=rng)[:k].tolist()
    return [candidates[i] for i in picks]


def _stable_seed(text: str, seed: int) -> int:
    """A seed from a string that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------- tokenising
def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text; BOS is added unless the text already starts with it (a chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    out: list[list[int]] = [[] for _ in texts]
    for flag in (False, True):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(idx, ids, strict=True):
                out[i] = list(row)
    return out


def split_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per pair, exactly as lm-evaluation-harness `_encode_pair`."""
    contexts, wholes = [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
    ctx_ids, whole_ids = encode(tokenizer, contexts), encode(tokenizer, wholes)
    return [(c, w[len(c) :]) for c, w in zip(ctx_ids, whole_ids, strict=True)]


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt ids exactly as training builds them (`medtune.format.encode_prompt`), batched.

    Tokenised without special tokens, with the tokenizer's BOS prefix added only where the text does
    not already carry it (a chat template writes `{{ bos_token }}` itself). The prefix is looked up
    once, not per prompt: this runs for every eval item.
    """
    from medtune.format import bos_prefix

    prefix = bos_prefix(tokenizer)
    rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [list(r) if not prefix or list(r[: len(prefix)]) == prefix else prefix + list(r) for r in rows]


def letter_tokens(tokenizer: Any, targets: Sequence[str]) -> tuple[list[int], list[int]]:
    """(tokens every answer starts with, the first differing token of each letter's target).

    Targets are tokenised alone, as training does (`encode_target`), so the compared token is the one
    the model was trained to emit after the prompt: `ĠB` after `Answer:` on the plain template, `B`
    after a chat generation prompt. If all targets share leading tokens (a SentencePiece `▁` before
    the letter), those are part of every answer: they are appended to the prompt and the next token
    is compared, since P(shared) multiplies every option alike and cannot change the ranking. A
    letter spelt with several tokens is scored by its first token only.
    """
    conts = [list(ids) for ids in tokenizer(list(targets), add_special_tokens=False)["input_ids"]]
    shared = 0
    while all(len(c) > shared + 1 for c in conts) and len({c[shared] for c in conts}) == 1:
        shared += 1
    firsts = [c[shared] if len(c) > shared else -1 for c in conts]
    if -1 in firsts or len(set(firsts)) != len(firsts):
        raise ValueError(f"answer letters do not map to distinct tokens: {targets} -> {conts}")
    return conts[0][:shared], firsts


# ------------------------------------------------------------------------------------- forward
def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and position ids (0 at each row's first real token).

    Explicit position_ids matter: transformers numbers positions 0..T-1 regardless of the mask, so a
    left-padded row would otherwise see its prompt at shifted positions and score differently from
    the same row unpadded.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


@torch.inference_mode()
def last_logprobs(model: Any, rows: Sequence[Sequence[int]], pad_id: int, keep: int = 1) -> torch.Tensor:
    """Log-softmax (float32) over the vocabulary at the last `keep` positions of each row: [B, keep, V]."""
    batch = _left_pad(rows, pad_id, _device_of(model))
    with final_layer_on_last_positions(model, keep):
        logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
    return logits[:, -keep:].float().log_softmax(-1)


@contextmanager
def final_layer_on_last_positions(model: Any, keep: int) -> Iterator[None]:
    """While active, the last decoder layer's MLP and attention output projection see only the last
    `keep` positions; their outputs are zero-padded back to full length before the residual add.

    Exact for the kept positions: both modules act on each position alone, and after the last layer
    only the final norm and `lm_head` (itself limited by `logits_to_keep`) follow. The other
    positions' final hidden states become wrong, which is why this is for scoring only. Models
    without the usual `layers[-1].mlp` / `self_attn.o_proj` layout run unchanged.
    """
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    last = layers[-1] if layers is not None and len(layers) else None
    targets = [getattr(last, "mlp", None), getattr(getattr(last, "self_attn", None), "o_proj", None)]
    lengths: list[int | None] = []

    def slice_input(_module: Any, args: tuple) -> tuple:
        # only a positional [B, T, H] input is sliced; any other call passes through untouched
        sliceable = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dim() == 3
        lengths.append(args[0].shape[1] if sliceable else None)
        return (args[0][:, -keep:], *args[1:]) if sliceable else args

    def pad_output(_module: Any, _args: tuple, out: Any) -> Any:
        length = lengths.pop()
        return out if length is None else F.pad(out, (0, 0, length - out.shape[1], 0))

    handles = []
    for module in (m for m in targets if isinstance(m, torch.nn.Module)):
        handles += [module.register_forward_pre_hook(slice_input), module.register_forward_hook(pad_output)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _truncate(row: list[int], max_len: int | None) -> list[int]:
    """Keep the last max_len tokens (the answer cue matters more than the start of a long stem)."""
    return row if max_len is None or len(row) <= max_len else row[-max_len:]


def _max_len(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


# A batch closes early when the next (shorter) row would be padded by more than this fraction of
# the batch's width. Padding costs as much as real tokens (and on CPU wide batches also fall out of
# cache), while one more forward pass costs little; on a large eval set neighbours in length order
# are nearly equal, so batches stay full and only the sparse long tail is split.
MAX_PAD_FRACTION = 0.05


def _length_batches(rows: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of `rows` in batches of at most `batch_size`, longest first, little padding in each."""
    batch: list[int] = []
    for i in _by_length(rows):
        if batch and (
            len(batch) == batch_size or len(rows[i]) < (1 - MAX_PAD_FRACTION) * len(rows[batch[0]])
        ):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _by_length(rows: Sequence[Sequence[int]]) -> list[int]:
    """Indices longest first; ties keep input order (stable sort), so batches are deterministic."""
    return sorted(range(len(rows)), key=lambda i: -len(rows[i]))


# ------------------------------------------------------------------------------------ scoring
def letter_scores(
    model: Any, tokenizer: Any, items: Sequence[McqaItem], batch_size: int
) -> list[list[float]]:
    """Per item, the log-probability of each answer letter's token right after the prompt."""
    cache: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}
    rows, candidates = [], []
    for item, prompt_ids in zip(
        items, encode_prompts(tokenizer, [it["prompt"] for it in items]), strict=True
    ):
        key = tuple(item["targets"])
        if key not in cache:
            cache[key] = letter_tokens(tokenizer, key)
        shared, firsts = cache[key]
        rows.append(_truncate(prompt_ids + shared, _max_len(model)))
        candidates.append(firsts)
    out: list[list[float]] = [[] for _ in items]
    for batch in _length_batches(rows, batch_size):
        logprobs = last_logprobs(model, [rows[i] for i in batch], _pad_id(tokenizer))[:, -1]
        for j, i in enumerate(batch):
            out[i] = logprobs[j, candidates[i]].tolist()
    return out


def option_pairs(item: McqaItem) -> list[tuple[str, str]]:
    """(prompt, continuation) per option: the target's leading whitespace, then the option text.

    With the plain template the target is " B", so the continuation is " <option text>", the same
    as lm-evaluation-harness's default `target_delimiter=" "`.
    """
    options = item["record"]["options"]
    pairs = []
    for target, text in zip(item["targets"], options, strict=False):
        lead = target[: len(target) - len(target.lstrip())]
        pairs.append((item["prompt"], lead + text))
    return pairs


def loglik_scores(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int
) -> list[float]:
    """Summed log-probability of each continuation given its context (lm-eval `loglikelihood`)."""
    encoded = split_pairs(tokenizer, pairs)
    # Like the harness: the model reads context + continuation minus the last token.
    rows = [_truncate((c + k)[:-1], _max_len(model)) for c, k in encoded]
    out = [0.0] * len(pairs)
    for batch in _length_batches(rows, batch_size):
        keep = max(len(encoded[i][1]) for i in batch)
        logprobs = last_logprobs(model, [rows[i] for i in batch], _pad_id(tokenizer), keep)
        for j, i in enumerate(batch):
            cont = encoded[i][1]
            lp = logprobs[j, keep - len(cont) :]
            out[i] = float(lp.gather(-1, torch.tensor(cont, device=lp.device)[:, None]).sum())
    return out


@torch.inference_mode()
def generate_texts(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy continuations of each prompt, decoded without special tokens."""
    rows = [_truncate(r, _max_len(model)) for r in encode(tokenizer, prompts)]
    out = [""] * len(prompts)
    for batch in _length_batches(rows, batch_size):
        padded = _left_pad([rows[i] for i in batch], _pad_id(tokenizer), _device_of(model))
        padded.pop("position_ids")  # generate() derives positions from the mask itself
        gen = model.generate(
            **padded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=_pad_id(tokenizer)
        )
        new = gen[:, padded["input_ids"].shape[1] :]
        for j, i in enumerate(batch):
            out[i] = tokenizer.decode(new[j], skip_special_tokens=True)
    return out


# ------------------------------------------------------------------------------ answer parsing
_LETTER = r"([A-J])"
# Most specific first: an explicit "answer is X" beats a stray "(B)" in a restated option.
_ANSWER_PATTERNS = [
    re.compile(r"정답\s*(?:은|는|:|：)?\s*[:：]?\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"(?:답|선택지)\s*(?:은|는|:|：)\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"(?i:answer)\s*(?:is|:)?\s*(?:option\s*)?[:：]?\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"(?i:correct (?:option|choice) is)\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"^\s*\(?" + _LETTER + r"\)?\s*(?:[.):：\]]|$|\s)"),
    re.compile(r"\(" + _LETTER + r"\)"),
    re.compile(r"(?<![A-Za-z])" + _LETTER + r"\s*(?:번|입니다|이다|가 정답|이 정답)"),
]
_NUMBER_ANSWER = re.compile(r"정답\s*(?:은|는|:)?\s*([1-9])\s*번|([1-9])\s*번\s*(?:입니다|이 정답|이다)")


def extract_answer(text: str, n_options: int) -> str | None:
    """The option letter a free-text reply chooses, or None when none is recognisable.

    Handles "Answer: B", "The answer is (B)", "정답: B", "정답은 B입니다", "(B)", "B.", a bare "B",
    and Korean option numbers ("정답은 2번" -> B). Only letters of existing options count.
    """
    valid = LETTERS[:n_options]
    for pattern in _ANSWER_PATTERNS:
        for match in pattern.finditer(text):
            if match.group(1) in valid:
                return match.group(1)
    for match in _NUMBER_ANSWER.finditer(text):
        number = int(match.group(1) or match.group(2))
        if 1 <= number <= n_options:
            return LETTERS[number - 1]
    return None


# -------------------------------------------------------------------------------- item results
def item_result(record: Record, scores: list[float] | None, predicted: str | None, **extra: Any) -> dict:
    """The per-item output line: identity, gold, prediction, scores and grouping fields."""
    valid = gold_is_valid(record)
    if not valid:
        status, correct = "unscorable", None
    elif predicted is None:
        status, correct = "unanswered", False
    else:
        status, correct = "ok", predicted == record["answer"]
    return {
        "id": record["id"],
        "gold": record.get("answer"),
        "predicted": predicted,
        "correct": correct,
        "status": status,
        "scores": None if scores is None else [round(s, 6) for s in scores],
        "language": record.get("language"),
        "source": record.get("source"),
        "subject": record.get("subject"),
        "tags": list(record.get("tags") or []),
        **extra,
    }


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, which lm-evaluation-harness relies on)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_chunk(
    model: Any,
    tokenizer: Any,
    items: Sequence[McqaItem],
    mode: Mode,
    batch_size: int,
    max_new_tokens: int = 32,
) -> list[dict]:
    """Score one chunk of items in `mode`; unscorable items are passed through unscored."""
    ok = [it for it in items if gold_is_valid(it["record"])]
    by_id: dict[str, dict] = {}
    if mode == "letter":
        for it, scores in zip(ok, letter_scores(model, tokenizer, ok, batch_size), strict=True):
            by_id[it["record"]["id"]] = item_result(it["record"], scores, LETTERS[_argmax(scores)])
    elif mode == "loglik":
        per_item = [option_pairs(it) for it in ok]
        flat = loglik_scores(model, tokenizer, [p for pairs in per_item for p in pairs], batch_size)
        start = 0
        for it, pairs in zip(ok, per_item, strict=True):
            scores, start = flat[start : start + len(pairs)], start + len(pairs)
            # acc_norm divides by the option text's length in characters, as the harness does
            # (`len(choice)`, without the leading delimiter).
            norm = [s / max(len(t), 1) for s, t in zip(scores, it["record"]["options"], strict=True)]
            pred_norm = LETTERS[_argmax(norm)]
            by_id[it["record"]["id"]] = item_result(
                it["record"],
                scores,
                LETTERS[_argmax(scores)],
                predicted_norm=pred_norm,
                correct_norm=pred_norm == it["record"]["answer"],
            )
    else:
        texts = generate_texts(model, tokenizer, [it["prompt"] for it in ok], batch_size, max_new_tokens)
        for it, text in zip(ok, texts, strict=True):
            pred = extract_answer(text, len(it["record"]["options"]))
            by_id[it["record"]["id"]] = item_result(it["record"], None, pred, generation=text)
    return [by_id.get(it["record"]["id"]) or item_result(it["record"], None, None) for it in items]


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[McqaItem],
    mode: Mode,
    batch_size: int = 8,
    out_path: Path | None = None,
    max_new_tokens: int = 32,
    progress: Progress | None = None,
) -> list[dict]:
    """Score all items, streaming each finished chunk to `out_path` (JSONL) in input order."""
    ids = [it["record"]["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("eval items must have unique ids (predictions are paired by id)")
    model.eval()
    results: list[dict] = []
    chunk = batch_size * CHUNK_BATCHES
    handle = out_path.open("w", encoding="utf-8") if out_path is not None else None
    try:
        for start in range(0, len(items), chunk):
            part = score_chunk(
                model, tokenizer, items[start : start + chunk], mode, batch_size, max_new_tokens
            )
            results.extend(part)
            if handle is not None:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
                handle.flush()
            if progress is not None:
                progress(len(part))
    finally:
        if handle is not None:
            handle.close()
    return results
