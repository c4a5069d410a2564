"""format.py: prompts, targets and pre-shifted labels on Llama-3, Gemma 3 and template-less tokenizers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from medtune.config import FormatConfig
from medtune.data.schema import Record
from medtune.errors import ConfigError
from medtune.format import (
    IGNORE_INDEX,
    encode_like_harness,
    encode_pairs,
    encode_prompt,
    encode_prompts,
    end_of_turn_text,
    join_prompts,
    render_prompt,
    render_target,
    tokenize_example,
    uses_chat_template,
)
from medtune.model.tiny import train_tokenizer


def make_record(**kw: object) -> Record:
    base: dict = dict(
        id="t:train:1",
        source="t",
        split="train",
        kind="mcqa",
        language="en",
        subject=None,
        tags=[],
        question="Which drug treats anaphylaxis first?",
        options=["Epinephrine", "Aspirin", "Insulin", "Saline"],
        answer="A",
        explanation=None,
        context=None,
        prompt=None,
        response=None,
        provenance={"file": "f.jsonl", "line": 1},
    )
    base.update(kw)
    return base  # type: ignore[return-value]


KO_MCQA = make_record(
    language="ko",
    question="급성 충수염의 가장 흔한 증상은?",
    options=["복통", "두통", "기침"],
    answer="A",
    explanation="우하복부 통증이 전형적이다.",
)
EN_INSTR = make_record(
    kind="instruction",
    options=[],
    answer=None,
    question="I have a cough.",
    prompt="I have a cough for two weeks. What should I do?",
    response="See a doctor for a chest X-ray.",
)
CONTEXT_MCQA = make_record(
    context="Aspirin inhibits COX enzymes.",
    question="What does aspirin inhibit?",
    options=["COX", "ACE", "MAO"],
    answer="A",
)
RECORDS = [make_record(), KO_MCQA, EN_INSTR, CONTEXT_MCQA]


@pytest.fixture(scope="module")
def tokenizers(tiny_llama_dir, tiny_gemma_dir) -> dict[str, PreTrainedTokenizerBase]:
    return {
        "llama": AutoTokenizer.from_pretrained(tiny_llama_dir),
        "gemma3": AutoTokenizer.from_pretrained(tiny_gemma_dir),
        "plain": train_tokenizer("llama", chat_template=False),
    }


TOKENIZER_NAMES = ["llama", "gemma3", "plain"]


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize("record", RECORDS, ids=["en_mcqa", "ko_mcqa", "en_instr", "context"])
def test_ids_equal_joint_tokenization_with_single_bos(tokenizers, name, record):
    """Tokenizing prompt and target apart must give the same ids as the whole text, BOS once."""
    tok, cfg = tokenizers[name], FormatConfig()
    ex = tokenize_example(record, tok, cfg)
    text = render_prompt(record, tok, cfg) + render_target(record, cfg, tok) + end_of_turn_text(tok, cfg)
    joint = tok(text, add_special_tokens=False)["input_ids"]
    if joint[0] != tok.bos_token_id:
        joint = [tok.bos_token_id, *joint]
    assert ex["input_ids"] == joint
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize("record", RECORDS, ids=["en_mcqa", "ko_mcqa", "en_instr", "context"])
def test_labels_are_preshifted_and_mask_the_prompt(tokenizers, name, record):
    tok, cfg = tokenizers[name], FormatConfig()
    ex = tokenize_example(record, tok, cfg)
    ids, labels = ex["input_ids"], ex["labels"]
    n_prompt = len(encode_prompt(render_prompt(record, tok, cfg), tok))
    assert len(ids) == len(labels)
    assert labels[-1] == IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in labels[: n_prompt - 1])
    assert labels[n_prompt - 1 : -1] == ids[n_prompt:]
    # The target's first token is the answer letter (or response), and the last target is end-of-turn.
    first = tok.decode([labels[n_prompt - 1]])
    expected = render_target(record, cfg, tok)
    assert expected.startswith(first)
    end_ids = tok(end_of_turn_text(tok, cfg), add_special_tokens=False)["input_ids"]
    assert labels[-1 - len(end_ids) : -1] == end_ids


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_train_on_prompt_labels_every_next_token(tokenizers, name):
    tok, cfg = tokenizers[name], FormatConfig(train_on_prompt=True)
    ex = tokenize_example(make_record(), tok, cfg)
    assert ex["labels"][:-1] == ex["input_ids"][1:]
    assert ex["labels"][-1] == IGNORE_INDEX


def test_leading_space_convention(tokenizers):
    """Plain template: `Answer:` + ` A`. Chat template: the model turn starts with `A`, no space."""
    cfg = FormatConfig()
    assert render_target(make_record(), cfg, tokenizers["plain"]) == " A"
    assert render_target(make_record(), cfg, tokenizers["llama"]) == "A"
    assert render_target(make_record(), FormatConfig(template="plain")) == " A"
    assert render_target(make_record(), FormatConfig(template="chat")) == "A"
    with pytest.raises(ValueError, match="tokenizer"):
        render_target(make_record(), cfg)


def test_template_plain_overrides_chat_template(tokenizers):
    cfg = FormatConfig(template="plain")
    prompt = render_prompt(make_record(), tokenizers["llama"], cfg)
    assert "<|start_header_id|>" not in prompt and prompt.endswith("\n\nAnswer:")
    assert not uses_chat_template(tokenizers["llama"], cfg)


def test_template_chat_without_a_template_is_a_config_error(tokenizers):
    with pytest.raises(ConfigError, match="format.template"):
        render_prompt(make_record(), tokenizers["plain"], FormatConfig(template="chat"))


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_korean_wording_and_ascii_colon(tokenizers, name):
    tok = tokenizers[name]
    ko = render_prompt(KO_MCQA, tok, FormatConfig())
    en = render_prompt(make_record(), tok, FormatConfig())
    assert "다음 문제의 정답을 고르시오." in ko and "A. 복통\nB. 두통\nC. 기침" in ko
    assert "Answer the following" in en and "A. Epinephrine" in en
    assert "：" not in ko + en  # the full-width colon trap
    if name == "plain":
        assert ko.endswith("정답:") and en.endswith("Answer:")
    forced = render_prompt(KO_MCQA, tok, FormatConfig(prompt_language="en"))
    assert "Answer the following" in forced and "정답" not in forced


def test_context_comes_before_question(tokenizers):
    prompt = render_prompt(CONTEXT_MCQA, tokenizers["plain"], FormatConfig())
    assert prompt.index("Aspirin inhibits COX") < prompt.index("What does aspirin inhibit?")


@pytest.mark.parametrize("include", [True, False])
def test_explanation_follows_the_letter_only_when_enabled(tokenizers, include):
    cfg = FormatConfig(include_explanation=include)
    target = render_target(KO_MCQA, cfg, tokenizers["gemma3"])
    assert target == ("A\n우하복부 통증이 전형적이다." if include else "A")


def test_instruction_target_is_the_response_with_end_marker(tokenizers):
    cfg = FormatConfig()
    for name, end in [("llama", "<|eot_id|>"), ("gemma3", "<end_of_turn>"), ("plain", "<|end_of_text|>")]:
        tok = tokenizers[name]
        assert end_of_turn_text(tok, cfg) == end
        ex = tokenize_example(EN_INSTR, tok, cfg)
        trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert tok.decode(trained).strip() == f"See a doctor for a chest X-ray.{end}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    question=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40),
    answer=st.sampled_from("ABC"),
    train_on_prompt=st.booleans(),
)
def test_label_count_matches_target_length(tokenizers, question, answer, train_on_prompt):
    """For any question text: targets = target tokens (or all-but-first when training on the prompt)."""
    tok = tokenizers["gemma3"]
    cfg = FormatConfig(train_on_prompt=train_on_prompt)
    record = make_record(question=question, options=["x", "y", "z"], answer=answer)
    ex = tokenize_example(record, tok, cfg)
    n_targets = sum(label != IGNORE_INDEX for label in ex["labels"])
    n_prompt = len(encode_prompt(render_prompt(record, tok, cfg), tok))
    assert n_targets == (len(ex["input_ids"]) - 1 if train_on_prompt else len(ex["input_ids"]) - n_prompt)


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_encode_prompts_keeps_one_bos_whether_or_not_the_text_carries_it(tokenizers, name):
    """The batched prompt rule is the single-text rule: BOS first and once, with or without the BOS
    string a chat template writes into the text."""
    tok = tokenizers[name]
    texts = [render_prompt(r, tok, FormatConfig()) for r in RECORDS]
    texts += [tok.bos_token + "Question: fever?\nAnswer:", "Question: fever?\nAnswer:"]
    rows = encode_prompts(texts, tok)
    assert rows == [encode_prompt(t, tok) for t in texts]
    assert all(row[0] == tok.bos_token_id and row.count(tok.bos_token_id) == 1 for row in rows)


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_joined_k_shot_prompt_encodes_with_one_bos(tokenizers, name):
    """k-shot prompts are several rendered prompts in one text: joined, only the first keeps BOS."""
    tok = tokenizers[name]
    parts = [render_prompt(r, tok, FormatConfig()) for r in (make_record(), KO_MCQA)]
    joined = join_prompts(parts, tok)
    assert joined.endswith(parts[1].removeprefix(tok.bos_token)) and joined.startswith(parts[0])
    assert encode_prompt(joined, tok).count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_harness_rule_agrees_with_the_training_rule_on_rendered_prompts(tokenizers, name):
    """Option log-likelihood and generation encode by lm-evaluation-harness's rule; on these
    tokenizers (a "BOS + text" post-processor) it must give the very ids training reads."""
    tok = tokenizers[name]
    for template in ("auto", "plain"):
        texts = [render_prompt(r, tok, FormatConfig(template=template)) for r in RECORDS]
        assert encode_like_harness(texts, tok) == encode_prompts(texts, tok)


def test_encode_pairs_moves_trailing_space_to_the_continuation(tokenizers):
    """lm-evaluation-harness `_encode_pair`: context ids + continuation ids is the whole text's
    encoding, and a context's trailing space is scored as part of the continuation."""
    tok = tokenizers["llama"]
    pairs = [("Question: fever?\nAnswer:", " aspirin"), ("Question: fever?\nAnswer: ", "aspirin")]
    (ctx_a, cont_a), (ctx_b, cont_b) = encode_pairs(pairs, tok)
    assert ctx_a == ctx_b and cont_a == cont_b
    assert ctx_a + cont_a == encode_like_harness(["Question: fever?\nAnswer: aspirin"], tok)[0]
    assert tok.decode(cont_a) == " aspirin"
