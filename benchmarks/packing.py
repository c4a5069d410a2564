"""Benchmark: how full medtune's packed rows are, and what packing buys in training throughput.

(1) Packing efficiency on the real shared data (KorMedMCQA train, MedQA dev, GenMedGPT ko + en),
    formatted by `medtune.format` and tokenized with the tiny trained tokenizer (Llama-3 chat
    template), at max_seq_len 1024 and 2048: medtune's best-fit-decreasing beside TRL's
    `pack_dataset(strategy="bfd")` on the same token lengths (TRL is an optional bench dependency,
    `pip install trl==1.16.0`; skipped if absent). Efficiency = real tokens / (rows x max_seq_len).
(2) Training steps of a tiny Llama on CPU over the same examples, padded vs packed: measured
    tokens/s ratio next to the theoretical ratio (padded slots / real tokens).

    python benchmarks/packing.py [--train-examples 64] [--hidden 128] [--layers 2] [--repeats 2]

Prints a table and writes benchmarks/results/packing.json. CPU timings are given as ratios only;
the machine is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from medtune.config import FormatConfig, PackingConfig  # noqa: E402
from medtune.data.schema import LETTERS, Record  # noqa: E402
from medtune.format import tokenize_example  # noqa: E402
from medtune.model.tiny import train_tokenizer  # noqa: E402
from medtune.packing import build_rows, collate, forward_kwargs, packing_stats  # noqa: E402

DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", "/work/shared/data"))
RESULTS = Path(__file__).resolve().parent / "results" / "packing.json"


# ---------------------------------------------------------------------------------------------- data
# A few lines of our own per file, so the benchmark does not depend on medtune.data.read's progress.


def _record(rid: str, source: str, kind: str, language: str, **kw: object) -> Record:
    base = dict(
        id=rid,
        source=source,
        split="train",
        kind=kind,
        language=language,
        subject=None,
        tags=[],
        question="",
        options=[],
        answer=None,
        explanation=None,
        context=None,
        prompt=None,
        response=None,
        provenance={"file": source, "line": 0},
    )
    base.update(kw)
    return base  # type: ignore[return-value]


def read_kormedmcqa() -> list[Record]:
    out = []
    for path in sorted((DATA / "kormedmcqa").glob("*/train.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f)):
                options = [row[c] for c in "ABCDE"]
                out.append(
                    _record(
                        f"kmm:{path.parent.name}:{n}",
                        "kormedmcqa",
                        "mcqa",
                        "ko",
                        question=row["question"],
                        options=options,
                        answer=row["answer"].strip(),
                    )
                )
    return out


def read_medqa() -> list[Record]:
    out = []
    with (DATA / "medqa" / "phrases_no_exclude_dev.jsonl").open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            item = json.loads(line)
            letters = sorted(item["options"])
            assert letters == list(LETTERS[: len(letters)])
            out.append(
                _record(
                    f"medqa:{n}",
                    "medqa",
                    "mcqa",
                    "en",
                    question=item["question"],
                    options=[item["options"][k] for k in letters],
                    answer=item["answer_idx"],
                )
            )
    return out


def read_genmedgpt() -> list[Record]:
    folder = DATA / "genmedgpt_5k_ko_en"
    out = []
    with (folder / "GenMedGPT-5k-ko.csv").open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f)):
            out.append(
                _record(
                    f"gmg-ko:{n}",
                    "genmedgpt",
                    "instruction",
                    "ko",
                    question=row["input"],
                    prompt=row["input"],
                    response=row["output"],
                )
            )
    items = json.loads((folder / "chatdoctor5k.json").read_text(encoding="utf-8"))
    for n, item in enumerate(items):
        prompt = f"{item['instruction']}\n\n{item['input']}".strip()
        out.append(
            _record(
                f"gmg-en:{n}",
                "genmedgpt",
                "instruction",
                "en",
                question=item["input"],
                prompt=prompt,
                response=item["output"],
            )
        )
    return out


# ------------------------------------------------------------------------------------- (1) efficiency


def trl_rows(lengths: list[int], seq_len: int, whole: bool) -> tuple[int, int, float]:
    """TRL bfd on the same lengths: (rows, real tokens kept, seconds). `whole`: one map batch."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    from trl import pack_dataset

    ds = Dataset.from_dict({"input_ids": [list(range(n)) for n in lengths]})
    kwargs = {"batch_size": None} if whole else None  # TRL's default is datasets' map batch of 1000
    start = time.perf_counter()
    packed = pack_dataset(ds, seq_len, strategy="bfd", map_kwargs=kwargs)
    seconds = time.perf_counter() - start
    real = sum(sum(s) for s in packed["seq_lengths"])
    return len(packed), real, seconds


def efficiency_table(lengths: list[int]) -> list[dict]:
    rows_out = []
    for seq_len in (1024, 2048):
        cfg = PackingConfig(max_seq_len=seq_len)
        start = time.perf_counter()
        rows = build_rows(lengths, cfg, seed=0, epoch=0)
        seconds = time.perf_counter() - start
        stats = packing_stats(rows, lengths, cfg)
        entry = {
            "max_seq_len": seq_len,
            "medtune_rows": stats["rows"],
            "medtune_eff": stats["efficiency"],
            "medtune_s": seconds,
            "truncated": stats["truncated"],
            "real_tokens": stats["real_tokens"],
        }
        try:
            for label, whole in (("trl", False), ("trl_whole", True)):
                n_rows, real, secs = trl_rows(lengths, seq_len, whole)
                assert real == stats["real_tokens"], "TRL and medtune should keep the same tokens"
                entry.update(
                    {f"{label}_rows": n_rows, f"{label}_eff": real / (n_rows * seq_len), f"{label}_s": secs}
                )
        except ImportError:
            entry["trl"] = "not installed (pip install trl==1.16.0)"
        rows_out.append(entry)
    return rows_out


# ------------------------------------------------------------------------------------- (2) training


def bench_model(tokenizer, hidden: int, layers: int, seq_len: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from medtune.model.tiny import tiny_config

    config = tiny_config(
        "llama",
        len(tokenizer),
        tokenizer,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=seq_len,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def train_epoch(model, optimizer, examples, rows, cfg, micro_batch: int, pad_id: int) -> float:
    """One optimizer step per micro-batch over `rows`; seconds spent in forward, backward and step."""
    seconds = 0.0
    for s in range(0, len(rows), micro_batch):
        batch = collate(examples, rows[s : s + micro_batch], cfg, pad_id=pad_id)
        start = time.perf_counter()
        logits = model(**forward_kwargs(model, batch)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        (loss / max(batch["num_target_tokens"], 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
    return seconds


def training_table(examples, tokenizer, args) -> dict:
    lengths = [min(len(ex["input_ids"]), args.train_seq_len) for ex in examples]
    packed_cfg = PackingConfig(max_seq_len=args.train_seq_len)
    padded_cfg = PackingConfig(max_seq_len=args.train_seq_len, mode="padded")
    packed_rows = build_rows(lengths, packed_cfg, seed=0, epoch=0)
    padded_rows = build_rows(lengths, padded_cfg, seed=0, epoch=0)
    real = sum(lengths)
    padded_slots = packing_stats(padded_rows, lengths, padded_cfg, args.padded_batch)
    packed_slots = packing_stats(packed_rows, lengths, packed_cfg, args.packed_batch)
    model = bench_model(tokenizer, args.hidden, args.layers, args.train_seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pad_id = tokenizer.pad_token_id
    train_epoch(
        model, optimizer, examples, padded_rows[: args.padded_batch], padded_cfg, args.padded_batch, pad_id
    )
    train_epoch(
        model, optimizer, examples, packed_rows[: args.packed_batch], packed_cfg, args.packed_batch, pad_id
    )
    times = {"padded": [], "packed": []}
    for _ in range(args.repeats):  # alternate, so machine load drifts hit both alike
        times["padded"].append(
            train_epoch(model, optimizer, examples, padded_rows, padded_cfg, args.padded_batch, pad_id)
        )
        times["packed"].append(
            train_epoch(model, optimizer, examples, packed_rows, packed_cfg, args.packed_batch, pad_id)
        )
    padded_s, packed_s = statistics.median(times["padded"]), statistics.median(times["packed"])
    theoretical = 1 / padded_slots["batch_efficiency"]
    measured = padded_s / packed_s  # same real tokens in both, so the time ratio is the tokens/s ratio
    return {
        "examples": len(examples),
        "real_tokens": real,
        "seq_len": args.train_seq_len,
        "model": f"llama hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}, sdpa, fp32",
        "padded_micro_batch": args.padded_batch,
        "packed_micro_batch": args.packed_batch,
        "padded_slots": round(real / padded_slots["batch_efficiency"]),
        "packed_slots": round(real / packed_slots["batch_efficiency"]),
        "padded_s": times["padded"],
        "packed_s": times["packed"],
        "theoretical_ratio": theoretical,
        "theoretical_ratio_vs_packed_slots": packed_slots["batch_efficiency"]
        / padded_slots["batch_efficiency"],
        "measured_ratio": measured,
        "measured_over_theoretical": measured / theoretical,
    }


# ---------------------------------------------------------------------------------------------- main


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_avg": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--train-seq-len", type=int, default=512)
    parser.add_argument("--padded-batch", type=int, default=8)
    parser.add_argument("--packed-batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()

    records = read_kormedmcqa() + read_medqa() + read_genmedgpt()
    tokenizer = train_tokenizer("llama")
    start = time.perf_counter()
    examples = [tokenize_example(r, tokenizer, FormatConfig()) for r in records]
    tokenize_s = time.perf_counter() - start
    lengths = [len(ex["input_ids"]) for ex in examples]
    print(
        f"{len(records)} records formatted + tokenized in {tokenize_s:.1f}s; "
        f"mean {statistics.mean(lengths):.0f} tokens, max {max(lengths)}"
    )

    eff = efficiency_table(lengths)
    print("\n(1) packing efficiency: real tokens / (rows x max_seq_len)")
    print(
        f"{'max_len':>8} {'medtune':>9} {'rows':>6} {'trl':>9} {'rows':>6} {'trl whole':>10} {'rows':>6} "
        f"{'trunc':>6} {'medtune s':>10} {'trl s':>7}"
    )
    for e in eff:
        print(
            f"{e['max_seq_len']:>8} {e['medtune_eff']:>9.2%} {e['medtune_rows']:>6} "
            f"{e.get('trl_eff', float('nan')):>9.2%} {e.get('trl_rows', '-'):>6} "
            f"{e.get('trl_whole_eff', float('nan')):>10.2%} {e.get('trl_whole_rows', '-'):>6} "
            f"{e['truncated']:>6} {e['medtune_s']:>10.3f} {e.get('trl_s', float('nan')):>7.3f}"
        )

    result = {
        "machine": machine(),
        "records": len(records),
        "tokenizer": "tiny trained BPE (vocab 4096)",
        "mean_tokens": statistics.mean(lengths),
        "efficiency": eff,
    }
    if not args.skip_train:
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(examples), generator=g)[: args.train_examples].tolist()
        train = training_table([examples[i] for i in pick], tokenizer, args)
        result["training"] = train
        print(
            f"\n(2) training throughput, {train['model']}, {train['examples']} examples, "
            f"{train['real_tokens']} real tokens, max_seq_len {train['seq_len']}"
        )
        print(
            f"  padded (micro-batch {train['padded_micro_batch']}, pad to longest): "
            f"{train['padded_slots']} slots, median {statistics.median(train['padded_s']):.2f}s"
        )
        print(
            f"  packed (micro-batch {train['packed_micro_batch']}): {train['packed_slots']} slots, "
            f"median {statistics.median(train['packed_s']):.2f}s"
        )
        print(
            f"  tokens/s packed / padded: measured {train['measured_ratio']:.2f}x, theoretical "
            f"{train['theoretical_ratio']:.2f}x (padded slots / real tokens) -> "
            f"{train['measured_over_theoretical']:.2f} of theoretical"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(
        f"\nmachine: {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs, "
        f"load {result['machine']['load_avg']}; wrote {RESULTS}"
    )


if __name__ == "__main__":
    main()
