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

Tokenisation is `medtune.format`'s. Letter mode reads exactly the tokens training put after the
prompt (`encode_prompts`, `letter_tokens`: prompt and target tokenised apart). Option log-likelihood
and generation follow lm-evaluation-harness (`encode_pairs`, `encode_like_harness`): trailing
whitespace of the prompt moves to the continuation, `prompt + continuation` is encoded whole and
split after the prompt's own token count, so `acc`/`acc_norm` match the harness token for token. On
the plain template the two agree. The items themselves come from `medtune.evaluate.prompts`, the
answer parsing and result lines from `medtune.evaluate.answers`.

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

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from medtune.data.schema import LETTERS
from medtune.evaluate.answers import extract_answer, gold_is_valid, item_result
from medtune.evaluate.prompts import McqaItem
from medtune.format import encode_like_harness, encode_pairs, encode_prompts, letter_tokens

Mode = Literal["letter", "loglik", "generate"]
Progress = Callable[[int], None]
# How many items are tokenised, scored and written together; within a chunk rows are length-sorted.
CHUNK_BATCHES = 16


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

    The sliced inputs, and the `[:, -keep:]` slice transformers hands `lm_head`, are made contiguous:
    on CPU a bf16 linear of a strided 3-D input takes oneDNN's batched path, which copies the weight
    once per row (measured 300x slower for a 16k-vocabulary head; a 262k head took minutes a batch).
    """
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    last = layers[-1] if layers is not None and len(layers) else None
    targets = [getattr(last, "mlp", None), getattr(getattr(last, "self_attn", None), "o_proj", None)]
    lengths: list[int | None] = []

    def slice_input(_module: Any, args: tuple) -> tuple:
        # only a positional [B, T, H] input is sliced; any other call passes through untouched
        sliceable = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dim() == 3
        lengths.append(args[0].shape[1] if sliceable else None)
        return (args[0][:, -keep:].contiguous(), *args[1:]) if sliceable else args

    def contiguous_input(_module: Any, args: tuple) -> tuple:
        return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args

    def pad_output(_module: Any, _args: tuple, out: Any) -> Any:
        length = lengths.pop()
        return out if length is None else F.pad(out, (0, 0, length - out.shape[1], 0))

    handles = []
    for module in (m for m in targets if isinstance(m, torch.nn.Module)):
        handles += [module.register_forward_pre_hook(slice_input), module.register_forward_hook(pad_output)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        handles.append(head.register_forward_pre_hook(contiguous_input))
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
        items, encode_prompts([it["prompt"] for it in items], tokenizer), strict=True
    ):
        key = tuple(item["targets"])
        if key not in cache:
            cache[key] = letter_tokens(key, tokenizer)
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
    encoded = encode_pairs(pairs, tokenizer)
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
    rows = [_truncate(r, _max_len(model)) for r in encode_like_harness(prompts, tokenizer)]
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
    if mode == "letter":
        scored = _letter_results(model, tokenizer, ok, batch_size)
    elif mode == "loglik":
        scored = _loglik_results(model, tokenizer, ok, batch_size)
    else:
        scored = _generate_results(model, tokenizer, ok, batch_size, max_new_tokens)
    by_id = {r["id"]: r for r in scored}
    return [by_id.get(it["record"]["id"]) or item_result(it["record"], None, None) for it in items]


def _letter_results(model: Any, tokenizer: Any, items: Sequence[McqaItem], batch_size: int) -> list[dict]:
    """Letter mode: the letter whose token is likeliest right after the prompt."""
    scores = letter_scores(model, tokenizer, items, batch_size)
    return [item_result(it["record"], s, LETTERS[_argmax(s)]) for it, s in zip(items, scores, strict=True)]


def _loglik_results(model: Any, tokenizer: Any, items: Sequence[McqaItem], batch_size: int) -> list[dict]:
    """Option log-likelihood: `predicted` by the summed log-probability (`acc`), `predicted_norm` by
    the sum per character of the option text (`acc_norm`)."""
    per_item = [option_pairs(it) for it in items]
    flat = loglik_scores(model, tokenizer, [p for pairs in per_item for p in pairs], batch_size)
    out, start = [], 0
    for it, pairs in zip(items, per_item, strict=True):
        scores, start = flat[start : start + len(pairs)], start + len(pairs)
        # acc_norm divides by the option text's length in characters, as the harness does
        # (`len(choice)`, without the leading delimiter).
        norm = [s / max(len(t), 1) for s, t in zip(scores, it["record"]["options"], strict=True)]
        pred_norm = LETTERS[_argmax(norm)]
        out.append(
            item_result(
                it["record"],
                scores,
                LETTERS[_argmax(scores)],
                predicted_norm=pred_norm,
                correct_norm=pred_norm == it["record"]["answer"],
            )
        )
    return out


def _generate_results(
    model: Any, tokenizer: Any, items: Sequence[McqaItem], batch_size: int, max_new_tokens: int
) -> list[dict]:
    """Generation: the letter the greedy reply names, or unanswered."""
    texts = generate_texts(model, tokenizer, [it["prompt"] for it in items], batch_size, max_new_tokens)
    return [
        item_result(it["record"], None, extract_answer(text, len(it["record"]["options"])), generation=text)
        for it, text in zip(items, texts, strict=True)
    ]


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
