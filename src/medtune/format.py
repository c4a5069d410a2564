"""Records -> prompt text, target text, and token ids with pre-shifted labels.

One formatting path serves training and evaluation: `render_prompt` is everything up to the answer,
`render_target` is the answer the model is trained on, and evaluation scores exactly the tokens that
follow `render_prompt`. Two conventions keep training and scoring identical:

- The answer cue always uses an ASCII colon (`정답:`, `Answer:`). A full-width `정답：` at scoring time
  after training on `정답: B` makes the log-likelihood measure the colon, not the answer.
- Leading space: on the plain template the prompt ends with the cue (`...Answer:`) and the target
  starts with a space (`" B"`), which is how `Answer: B` tokenizes as running text (byte-level BPE
  glues the space to the letter: `ĠB`). Through a chat template the prompt ends with the model-turn
  header and the target has no leading space (`"B"`), as the template would render it.

Prompt and target are tokenized separately and concatenated, so the prompt/answer boundary in token
space is exact by construction (no offset mapping), and BOS appears exactly once.

This module is the only token path: training, letter scoring, held-out NLL and `medtune chat` encode
prompts with `encode_prompts` (BOS once) and answers with `encode_answers`; k-shot prompts are joined
by `join_prompts`. Option log-likelihood and generation follow lm-evaluation-harness instead
(`encode_like_harness`, `encode_pairs`), so their numbers match the harness token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from transformers import PreTrainedTokenizerBase

from medtune.config import FormatConfig
from medtune.data.schema import LETTERS, Record
from medtune.errors import ConfigError

IGNORE_INDEX = -100
"""Label value that contributes no loss (PyTorch cross-entropy's default `ignore_index`)."""

_WORDING = {
    "ko": {
        "mcqa": "다음 문제의 정답을 고르시오.",
        "context": "참고:",
        "question": "문제:",
        "answer_cue": "정답:",
        "response_cue": "답변:",
    },
    "en": {
        "mcqa": "Answer the following multiple-choice question by choosing the correct option.",
        "context": "Context:",
        "question": "Question:",
        "answer_cue": "Answer:",
        "response_cue": "Response:",
    },
}
_SENTINEL = "\x00MEDTUNE_ANSWER\x00"


class Example(TypedDict):
    """One tokenized record. `labels[t]` is the token position `t` must predict, or -100."""

    input_ids: list[int]
    labels: list[int]


def prompt_language(record: Record, cfg: FormatConfig) -> str:
    """`ko` or `en`: the wording used for this record (Korean only for Korean records under `auto`)."""
    if cfg.prompt_language != "auto":
        return cfg.prompt_language
    return "ko" if record["language"] == "ko" else "en"


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: FormatConfig) -> bool:
    """Whether prompts go through the tokenizer's chat template (`template: auto` and one exists)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has_template:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(
            f"format.template: 'chat' but {name} has no chat template; use format.template: auto or plain"
        )
    return has_template and cfg.template != "plain"


def _mcqa_body(record: Record, words: dict[str, str]) -> str:
    """Instruction, optional context, question and lettered options; no answer cue."""
    parts = [words["mcqa"]]
    if record.get("context"):
        parts.append(f"{words['context']}\n{record['context'].strip()}")
    options = "\n".join(f"{LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(record["options"]))
    parts.append(f"{words['question']} {record['question'].strip()}\n{options}")
    return "\n\n".join(parts)


def _user_text(record: Record, words: dict[str, str]) -> str:
    """What the user says: the MCQA body or the instruction prompt."""
    if record["kind"] == "mcqa":
        return _mcqa_body(record, words)
    return (record.get("prompt") or record["question"]).strip()


def render_prompt(record: Record, tokenizer: PreTrainedTokenizerBase, cfg: FormatConfig) -> str:
    """Everything the model sees before the answer, ending where the answer's first token goes.

    Chat path: the chat template with the user turn and `add_generation_prompt=True` (the text may
    carry the template's BOS string; `encode_prompt` keeps BOS single). Plain path: the user text
    followed by the answer cue, e.g. `...\\n\\n정답:`.
    """
    words = _WORDING[prompt_language(record, cfg)]
    user = _user_text(record, words)
    if uses_chat_template(tokenizer, cfg):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    cue = words["answer_cue"] if record["kind"] == "mcqa" else words["response_cue"]
    return f"{user}\n\n{cue}"


def render_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, cfg: FormatConfig
) -> str:
    """A chat (`[{role, content}]`, ending with the user) in the format training used, up to the reply.

    One user message renders exactly as `render_prompt` renders an instruction record with that
    prompt, so `medtune chat` talks to a model in the format it was trained on. Earlier exchanges go
    through the chat template, or on the plain template as `user\n\nResponse: reply` paragraphs
    (training never saw several turns there; this is the nearest continuation of its format).
    """
    if uses_chat_template(tokenizer, cfg):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = []
    for i, message in enumerate(messages):
        if message["role"] != "user":
            continue
        cue = _WORDING[_message_language(message["content"], cfg)]["response_cue"]
        reply = messages[i + 1]["content"].strip() if i + 1 < len(messages) else None
        parts.append(f"{message['content'].strip()}\n\n{cue}" + (f" {reply}" if reply is not None else ""))
    return "\n\n".join(parts)


def _message_language(text: str, cfg: FormatConfig) -> str:
    """The instruction wording for a chat message: as `prompt_language` picks it for a record."""
    from medtune.data.langid import detect_language

    if cfg.prompt_language != "auto":
        return cfg.prompt_language
    return "ko" if detect_language(text) == "ko" else "en"


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase, cfg: FormatConfig) -> str:
    """What closes the answer: the chat template's end-of-turn marker, else the EOS token.

    The marker is read off the template itself (render a model turn, take what follows its content),
    so Llama-3's `<|eot_id|>` and Gemma's `<end_of_turn>` both come out right without a table.
    Trailing newlines after the marker are dropped: generation stops at the marker.
    """
    if uses_chat_template(tokenizer, cfg):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        tail = rendered.split(_SENTINEL, 1)[1].rstrip("\n")
        if tail:
            return tail
    return tokenizer.eos_token or ""


def render_target(record: Record, cfg: FormatConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The answer text trained on, without the end-of-turn marker (`tokenize_example` adds it).

    MCQA: the gold letter, then a newline and the explanation when `include_explanation` and one
    exists. Instruction: the response. The leading space (plain template) depends on which template
    the prompt uses, so pass the tokenizer under `template: auto`; with `template: plain` or `chat`
    the config alone decides.
    """
    if cfg.template == "auto" and tokenizer is None:
        raise ValueError(
            "render_target needs the tokenizer under template 'auto' (leading space depends on it)"
        )
    chat = cfg.template == "chat" or (tokenizer is not None and uses_chat_template(tokenizer, cfg))
    if record["kind"] == "mcqa":
        if record["answer"] is None:
            raise ValueError(f"{record['id']}: MCQA record without an answer")
        text = record["answer"]
        if cfg.include_explanation and record.get("explanation"):
            text = f"{text}\n{record['explanation'].strip()}"
    else:
        text = (record.get("response") or "").strip()
    return text if chat else f" {text}"


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before text by itself (usually `[bos]`, sometimes nothing)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    start = _find(with_special, plain)
    return with_special[:start] if start >= 0 else []


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def join_prompts(parts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> str:
    """Concatenate rendered prompts (k-shot examples, then the question), keeping only the first BOS
    a chat template writes, so the joined text still encodes with BOS exactly once."""
    bos = getattr(tokenizer, "bos_token", None)
    out = [parts[0]]
    for part in parts[1:]:
        out.append(part[len(bos) :] if bos and part.startswith(bos) else part)
    return "".join(out)


def encode_prompts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of rendered prompts with BOS exactly once: the rule training, letter scoring, NLL
    and chat share.

    Trap: chat templates render `{{ bos_token }}` into the text, and the tokenizer's post-processor
    would add another; so tokenize without special tokens and add the prefix only if it is missing.
    The prefix is looked up once per call, not per prompt: evaluation encodes every item here.
    """
    prefix = bos_prefix(tokenizer)
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(r) if not prefix or list(r[: len(prefix)]) == prefix else prefix + list(r) for r in rows]


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of one rendered prompt with BOS exactly once (`encode_prompts` of one text)."""
    return encode_prompts([text], tokenizer)[0]


def encode_answers(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of answer texts as training tokenises them: each alone, no special tokens, so the
    first id is the one the model learns to emit right after the prompt."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_target(text: str, tokenizer: PreTrainedTokenizerBase, cfg: FormatConfig) -> list[int]:
    """Token ids of the answer followed by the end-of-turn marker (or EOS), no BOS."""
    ids = encode_answers([text], tokenizer)[0]
    end = end_of_turn_text(tokenizer, cfg)
    if end:
        ids = ids + tokenizer(end, add_special_tokens=False)["input_ids"]
    return ids


def letter_tokens(targets: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(tokens every answer starts with, the first differing token of each letter's target).

    Targets are tokenised alone, as training does (`encode_answers`), so the compared token is the
    one the model was trained to emit after the prompt: `ĠB` after `Answer:` on the plain template,
    `B` after a chat generation prompt. If all targets share leading tokens (a SentencePiece `▁`
    before the letter), those are part of every answer: they are appended to the prompt and the next
    token is compared, since P(shared) multiplies every option alike and cannot change the ranking.
    A letter spelt with several tokens is scored by its first token only.
    """
    conts = encode_answers(targets, tokenizer)
    shared = 0
    while all(len(c) > shared + 1 for c in conts) and len({c[shared] for c in conts}) == 1:
        shared += 1
    firsts = [c[shared] if len(c) > shared else -1 for c in conts]
    if -1 in firsts or len(set(firsts)) != len(firsts):
        raise ValueError(f"answer letters do not map to distinct tokens: {targets} -> {conts}")
    return conts[0][:shared], firsts


def encode_like_harness(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids by lm-evaluation-harness's rule: the tokenizer's own special tokens, unless the text
    already starts with the BOS string (a chat template wrote it). Option log-likelihood and
    generation use it, so `acc`/`acc_norm` match the harness token for token; on the usual
    "BOS + text" post-processor it gives the same ids as `encode_prompts`."""
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


def encode_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per pair, exactly as lm-evaluation-harness `_encode_pair`:
    trailing whitespace of the context moves to the continuation, `context + continuation` is
    encoded whole and split after the context's own token count."""
    contexts, wholes = [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
    ctx_ids, whole_ids = encode_like_harness(contexts, tokenizer), encode_like_harness(wholes, tokenizer)
    return [(c, w[len(c) :]) for c, w in zip(ctx_ids, whole_ids, strict=True)]


def shifted_labels(input_ids: list[int], num_prompt: int, train_on_prompt: bool) -> list[int]:
    """labels[t] = input_ids[t+1] where t+1 is a trained token, -100 elsewhere and at the last position.

    Pre-shifting makes packing safe: the last position of a document has no target, so nothing
    ever learns to predict the first token of the next document in the row.
    """
    first_target = 1 if train_on_prompt else max(num_prompt, 1)
    labels = [IGNORE_INDEX] * len(input_ids)
    for t in range(first_target - 1, len(input_ids) - 1):
        labels[t] = input_ids[t + 1]
    return labels


def tokenize_example(record: Record, tokenizer: PreTrainedTokenizerBase, cfg: FormatConfig) -> Example:
    """Prompt ids + target ids (tokenized apart, then joined) with pre-shifted labels."""
    prompt_ids = encode_prompt(render_prompt(record, tokenizer, cfg), tokenizer)
    target_ids = encode_target(render_target(record, cfg, tokenizer), tokenizer, cfg)
    input_ids = prompt_ids + target_ids
    return {"input_ids": input_ids, "labels": shifted_labels(input_ids, len(prompt_ids), cfg.train_on_prompt)}
