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
"""

from __future__ import annotations

from typing import TypedDict

from transformers import PreTrainedTokenizerBase

from medtune.config import PackingConfig
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


def prompt_language(record: Record, cfg: PackingConfig) -> str:
    """`ko` or `en`: the wording used for this record (Korean only for Korean records under `auto`)."""
    if cfg.prompt_language != "auto":
        return cfg.prompt_language
    return "ko" if record["language"] == "ko" else "en"


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: PackingConfig) -> bool:
    """Whether prompts go through the tokenizer's chat template (`template: auto` and one exists)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has_template:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(
            f"packing.template: 'chat' but {name} has no chat template; use packing.template: auto or plain"
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


def render_prompt(record: Record, tokenizer: PreTrainedTokenizerBase, cfg: PackingConfig) -> str:
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
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, cfg: PackingConfig
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


def _message_language(text: str, cfg: PackingConfig) -> str:
    """The instruction wording for a chat message: as `prompt_language` picks it for a record."""
    from medtune.data.langid import detect_language

    if cfg.prompt_language != "auto":
        return cfg.prompt_language
    return "ko" if detect_language(text) == "ko" else "en"


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase, cfg: PackingConfig) -> str:
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


def render_target(
    record: Record, cfg: PackingConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
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


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a rendered prompt with BOS exactly once.

    Trap: chat templates render `{{ bos_token }}` into the text, and the tokenizer's post-processor
    would add another; so tokenize without special tokens and add the prefix only if it is missing.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = bos_prefix(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    return ids


def encode_target(text: str, tokenizer: PreTrainedTokenizerBase, cfg: PackingConfig) -> list[int]:
    """Token ids of the answer followed by the end-of-turn marker (or EOS), no BOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    end = end_of_turn_text(tokenizer, cfg)
    if end:
        ids = ids + tokenizer(end, add_special_tokens=False)["input_ids"]
    return ids


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


def tokenize_example(record: Record, tokenizer: PreTrainedTokenizerBase, cfg: PackingConfig) -> Example:
    """Prompt ids + target ids (tokenized apart, then joined) with pre-shifted labels."""
    prompt_ids = encode_prompt(render_prompt(record, tokenizer, cfg), tokenizer)
    target_ids = encode_target(render_target(record, cfg, tokenizer), tokenizer, cfg)
    input_ids = prompt_ids + target_ids
    return {"input_ids": input_ids, "labels": shifted_labels(input_ids, len(prompt_ids), cfg.train_on_prompt)}
