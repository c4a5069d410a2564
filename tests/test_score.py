"""Scoring modes against hand-computed log-softmax on tiny models; batching; answer extraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.config import FormatConfig
from medtune.data.schema import Record
from medtune.evaluate import score as S
from medtune.evaluate.answers import extract_answer
from medtune.evaluate.prompts import build_items, select_shots
from medtune.format import encode_prompt, letter_tokens


def make_record(
    i: int, lang: str = "en", n_options: int = 4, answer: str | None = "B", source: str = "s"
) -> Record:
    stem = ("환자가 발열과 복통을 호소한다. " if lang == "ko" else "A patient has fever and pain. ") * (
        1 + i % 4
    )
    return {
        "id": f"{source}:eval:{i}",
        "source": source,
        "split": "eval",
        "kind": "mcqa",
        "language": lang,
        "subject": "nurse" if lang == "ko" else None,
        "tags": ["medical_law"] if i % 5 == 0 else [],
        "question": f"{stem}Which drug {i}?",
        "options": [f"drug {j} " * (1 + (i + j) % 3) for j in range(n_options)],
        "answer": answer,
        "explanation": "because",
        "context": None,
        "prompt": None,
        "response": None,
        "provenance": {"file": "x.jsonl", "line": i + 1},
    }


RECORDS = [make_record(i, "ko" if i % 2 else "en", n_options=4 + i % 2) for i in range(12)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_llama_dir
    )


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_gemma_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_gemma_dir
    )


def _plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Reference: one unpadded forward, full logits, our own log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return logits - torch.logsumexp(logits, -1, keepdim=True)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_letter_scores_equal_hand_computed_softmax(llama, template: str) -> None:
    model, tok = llama
    cfg = FormatConfig(template=template)
    items = build_items(RECORDS[:5], tok, cfg)
    # the target convention from medtune.format: " B" after "Answer:", "B" after a chat header
    assert items[0]["targets"][1] == (" B" if template == "plain" else "B")
    got = S.letter_scores(model, tok, items, batch_size=3)
    for item, scores in zip(items, got, strict=True):
        ids = encode_prompt(item["prompt"], tok)
        letters = [tok(t, add_special_tokens=False)["input_ids"][0] for t in item["targets"]]
        ref = _plain_logprobs(model, ids)[-1, letters]
        assert torch.allclose(torch.tensor(scores, dtype=torch.float64), ref, atol=1e-4)


def test_plain_letter_token_is_the_space_letter_token(llama) -> None:
    _, tok = llama
    shared, firsts = letter_tokens([" A", " B", " C"], tok)
    assert shared == [] and firsts == [tok.convert_tokens_to_ids(f"Ġ{c}") for c in "ABC"]
    assert firsts != letter_tokens(["A", "B", "C"], tok)[1]  # "A" and " A" really are different tokens


def test_shared_leading_tokens_move_into_the_prompt(llama) -> None:
    model, tok = llama
    targets = ["\nA", "\nB", "\nC", "\nD"]
    shared, firsts = letter_tokens(targets, tok)
    assert shared == tok("\n", add_special_tokens=False)["input_ids"] and len(set(firsts)) == 4
    item = {"record": RECORDS[0], "prompt": "Question: fever?\nAnswer:", "targets": targets}
    ids = encode_prompt(item["prompt"], tok) + shared
    ref = _plain_logprobs(model, ids)[-1, firsts]
    got = S.letter_scores(model, tok, [item], 1)[0]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref, atol=1e-4)


def test_loglik_equals_hand_computed_sum(llama) -> None:
    model, tok = llama
    items = build_items(RECORDS[:2], tok, FormatConfig(template="plain"))
    pairs = [p for it in items for p in S.option_pairs(it)]
    assert pairs[0][1].startswith(" ")  # harness-style " <option>" after "Answer:"
    got = S.loglik_scores(model, tok, pairs, batch_size=5)
    for (ctx, cont), value in zip(pairs, got, strict=True):
        ctx_ids = tok(ctx)["input_ids"]
        whole = tok(ctx + cont)["input_ids"]
        assert whole[: len(ctx_ids)] == ctx_ids
        lp = _plain_logprobs(model, whole[:-1])
        ref = sum(lp[t - 1, whole[t]].item() for t in range(len(ctx_ids), len(whole)))
        assert value == pytest.approx(ref, abs=1e-3)


def test_acc_norm_divides_by_option_characters(llama) -> None:
    model, tok = llama
    items = build_items(RECORDS[:3], tok, FormatConfig(template="plain"))
    for res, item in zip(S.score_chunk(model, tok, items, "loglik", 4), items, strict=True):
        norm = [s / len(o) for s, o in zip(res["scores"], item["record"]["options"], strict=True)]
        assert res["predicted_norm"] == "ABCDE"[norm.index(max(norm))]
        assert res["predicted"] == "ABCDE"[res["scores"].index(max(res["scores"]))]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("mode", ["letter", "loglik"])
def test_batched_equals_unbatched(request, arch: str, mode: str) -> None:
    model, tok = request.getfixturevalue(arch)
    items = build_items(RECORDS[:8], tok, FormatConfig(template="plain"))
    one = S.score_items(model, tok, items, mode, batch_size=1)
    many = S.score_items(model, tok, items, mode, batch_size=5)
    for a, b in zip(one, many, strict=True):
        assert a["id"] == b["id"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("keep", [1, 3])
def test_final_layer_on_last_positions_is_exact_and_leaves_no_hooks(request, arch: str, keep: int) -> None:
    model, _ = request.getfixturevalue(arch)
    last = model.get_decoder().layers[-1]
    rows = [list(range(5, 5 + n)) for n in (9, 4, 7)]
    seen: list[int] = []
    # a forward hook is given the input as the pre-hooks left it
    spy = last.mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    try:
        fast = S.last_logprobs(model, rows, 0, keep)
    finally:
        spy.remove()
    assert seen == [keep]  # the hook really ran: the final MLP saw only the kept positions
    assert not last.mlp._forward_pre_hooks and not last.mlp._forward_hooks
    assert not last.self_attn.o_proj._forward_pre_hooks and not last.self_attn.o_proj._forward_hooks
    for row, got in zip(rows, fast, strict=True):
        ref = _plain_logprobs(model, row)[-keep:]
        assert torch.allclose(got.double(), ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_scoring_hands_every_linear_after_the_slice_a_contiguous_input(request, arch: str) -> None:
    """A strided [B, keep, H] input sends a CPU bf16 linear down oneDNN's batched path, which copies the
    weight per row: minutes per batch for Gemma's 262k-token head. Sliced inputs must be contiguous."""
    model, _ = request.getfixturevalue(arch)
    last = model.get_decoder().layers[-1]
    watched = [model.get_output_embeddings(), last.mlp.gate_proj, last.self_attn.o_proj]
    seen: list[bool] = []
    spies = [
        m.register_forward_hook(lambda _m, args, _o: seen.append(args[0].is_contiguous())) for m in watched
    ]
    try:
        S.last_logprobs(model, [list(range(5, 5 + n)) for n in (9, 4, 7)], 0, 1)
    finally:
        for spy in spies:
            spy.remove()
    assert len(seen) == 3 and all(seen)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_length_batches_cover_every_row_once_with_little_padding() -> None:
    lengths = [100, 99, 98, 97, 96, 95, 94, 60, 59, 300, 10, 10, 10, 10, 10]
    rows = [[0] * n for n in lengths]
    batches = list(S._length_batches(rows, 4))
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    assert all(1 <= len(b) <= 4 for b in batches)
    for b in batches:
        width = max(lengths[i] for i in b)
        assert all(lengths[i] >= 0.95 * width for i in b)
    # longest first; equal lengths fill whole batches; rows within 5% share a batch
    assert batches == [[9], [0, 1, 2, 3], [4, 5, 6], [7, 8], [10, 11, 12, 13], [14]]


def test_predictions_stream_in_input_order_and_are_deterministic(llama, tmp_path: Path) -> None:
    model, tok = llama
    records = [*RECORDS, make_record(99, answer="F"), make_record(98, answer=None)]
    items = build_items(records, tok, FormatConfig(template="plain"))
    S.score_items(model, tok, items, "letter", 4, tmp_path / "a.jsonl")
    S.score_items(model, tok, items, "letter", 4, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in records]
    first = lines[0]
    assert {"id", "gold", "predicted", "scores", "language", "source", "subject", "tags"} <= first.keys()
    # an invalid gold label (F for 4 options, or none) is unscorable, never wrong
    assert [x["status"] for x in lines[-2:]] == ["unscorable", "unscorable"]
    assert all(x["correct"] is None for x in lines[-2:])
    assert all(x["correct"] == (x["predicted"] == x["gold"]) for x in lines[:-2])


def test_generate_mode_runs_and_reports_unanswered(llama) -> None:
    model, tok = llama
    items = build_items(RECORDS[:4], tok, FormatConfig(template="plain"))
    res = S.score_items(model, tok, items, "generate", batch_size=2, max_new_tokens=4)
    assert all(r["status"] in ("ok", "unanswered") for r in res)
    for r in res:
        assert r["predicted"] == extract_answer(r["generation"], 4 + int(r["id"].split(":")[-1]) % 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: B", "B"),
        (" C", "C"),
        ("D. Ceftriaxone", "D"),
        ("The answer is (B).", "B"),
        ("the correct answer is: C because", "C"),
        ("I think (E) fits best", "E"),
        ("정답: A", "A"),
        ("정답은 D입니다.", "D"),
        ("정답은 (C)", "C"),
        ("따라서 정답은 3번입니다.", "C"),
        ("답: E", "E"),
        ("B가 정답이다", "B"),
        ("환자는 발열이 있다", None),
        ("Answer: F", None),  # not an option of a 4-option item
        ("Because of the fever", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text, 4 if expected != "E" else 5) == expected


def test_select_shots_never_uses_the_item_and_is_deterministic() -> None:
    item = RECORDS[0]
    pool = [make_record(i, "en", source="s") for i in range(0, 30, 2)]  # contains the item's own id
    pool += [{**item, "id": "s:train:dup"}]  # same question under another id (KorMedMCQA fewshot)
    pool += [make_record(100 + i, "en", source="other") for i in range(10)]
    shots = select_shots(item, pool, 3, seed=0)
    assert len(shots) == 3 and all(s["source"] == "s" for s in shots)
    assert all(s["id"] != item["id"] and s["question"] != item["question"] for s in shots)
    assert shots == select_shots(item, list(reversed(pool)), 3, seed=0)
    assert select_shots(item, pool, 0, seed=0) == []
    with pytest.raises(ValueError):
        select_shots(item, pool[:2], 3, seed=0)


def test_k_shot_prompt_contains_examples_and_one_bos(llama) -> None:
    _, tok = llama
    pool = [make_record(200 + i, "en", source="s") for i in range(5)]
    for template in ("plain", "chat"):
        item = build_items([RECORDS[0]], tok, FormatConfig(template=template), k_shot=2, pool=pool)[0]
        zero = build_items([RECORDS[0]], tok, FormatConfig(template=template))[0]
        assert item["prompt"].endswith(zero["prompt"].removeprefix(tok.bos_token))
        assert item["prompt"].count(tok.bos_token) <= 1
        assert sum(q["question"] in item["prompt"] for q in pool) == 2
