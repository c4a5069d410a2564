"""The training loop: token-weighted loss, accumulation, FSDP2 parity, resume after kill -9, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medtune.config import load_config
from medtune.train import run_train

KO = ["고혈압 환자의 치료 목표 혈압은?", "당뇨병의 진단 기준으로 옳은 것은?", "폐렴의 흔한 원인균은?"]
EN = [
    "Which drug is first-line for hypertension?",
    "What is the most common cause of pneumonia?",
    "Which test confirms diabetes mellitus?",
]


def _records() -> list[dict]:
    """A few dozen short MCQA and instruction records in both languages, in the normalised schema."""
    records = []
    for i in range(36):
        lang = "ko" if i % 2 else "en"
        stem = (KO if lang == "ko" else EN)[i % 3]
        rec = {
            "id": f"t:train:{i}",
            "source": f"toy_{lang}",
            "split": "train",
            "language": lang,
            "subject": None,
            "tags": [],
            "explanation": None,
            "context": None,
            "provenance": {"file": "toy", "line": i + 1},
        }
        if i % 4 == 3:
            rec.update(
                kind="instruction",
                question="",
                options=[],
                answer=None,
                prompt=f"{stem} ({i})",
                response=("설명합니다. " if lang == "ko" else "It is. ") * (1 + i % 5),
            )
        else:
            rec.update(
                kind="mcqa",
                question=f"{stem} ({i})",
                options=[f"opt {j} {i}" for j in range(4)],
                answer="ABCD"[i % 4],
                prompt=None,
                response=None,
            )
        records.append(rec)
    return records


def make_run(tmp_path: Path, model_dir: Path, **sections: dict) -> Path:
    """A config + prepared data dir; returns the config path. Sections override the defaults below."""
    prepared = tmp_path / "run" / "prepare"
    prepared.mkdir(parents=True)
    with (prepared / "train.jsonl").open("w", encoding="utf-8") as f:
        for r in _records():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (tmp_path / "toy.jsonl").write_text("{}\n")
    body = {
        "seed": 3,
        "data": {"train": [{"path": "toy.jsonl"}]},
        "model": {"path": str(model_dir), "dtype": "float32"},
        "quantization": {"mode": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "packing": {"mode": "packed", "max_seq_len": 128},
        "train": {
            "max_steps": 8,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "lr": 5e-3,
            "warmup_steps": 0,
            "scheduler": "constant",
            "gradient_checkpointing": False,
        },
        "output": {"dir": "run"},
    }
    for name, values in sections.items():
        body[name] = {**body.get(name, {}), **values}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return path


def train_in_process(cfg_path: Path) -> dict:
    cfg = load_config(cfg_path)
    return run_train(cfg, cfg.output.dir / "prepare", cfg.output.dir / "train")


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_loss_goes_down_and_the_adapter_reloads_with_plain_peft(tmp_path: Path, tiny_llama_dir: Path) -> None:
    # Training on the prompt too gives each step hundreds of target tokens, so the curve is not noise.
    cfg_path = make_run(
        tmp_path, tiny_llama_dir, train={"max_steps": 25, "lr": 3e-2}, format={"train_on_prompt": True}
    )
    summary = train_in_process(cfg_path)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 26))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    # A frozen random base with rank-4 adapters learns slowly; 0.3 nats is well outside step noise.
    assert last < first - 0.3, (first, last)
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"])

    # The saved adapter, loaded by plain peft, matches the final checkpoint's LoRA weights.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, tmp_path / "run" / "train" / "adapter").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert not torch.allclose(tuned(ids).logits, plain(ids).logits, atol=1e-4)  # the adapter does something
    saved = adapter(tmp_path / "run")
    live = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    assert len(live) == len(saved)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path, tiny_llama_dir: Path) -> None:
    a = make_run(tmp_path / "a", tiny_llama_dir, train={"micro_batch_size": 4, "grad_accum": 2})
    b = make_run(tmp_path / "b", tiny_llama_dir, train={"micro_batch_size": 8, "grad_accum": 1})
    train_in_process(a)
    train_in_process(b)
    la, lb = metrics(tmp_path / "a" / "run"), metrics(tmp_path / "b" / "run")
    for x, y in zip(la, lb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["target_tokens"] == y["target_tokens"]
    assert_same_adapter(adapter(tmp_path / "a" / "run"), adapter(tmp_path / "b" / "run"), atol=1e-5)


def _launch(cfg_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "medtune", "train", str(cfg_path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    path = run_dir / "train" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.01)
    raise AssertionError("training did not reach the step in time")


def _prepared_run_json(run_dir: Path) -> None:
    """The CLI wants a finished prepare stage; the test wrote its data by hand."""
    (run_dir / "prepare" / "run.json").write_text(json.dumps({"stage": "prepare"}))


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path: Path, tiny_llama_dir: Path) -> None:
    train = {"max_steps": 30, "save_every": 3}
    ref_cfg = make_run(tmp_path / "ref", tiny_llama_dir, train=train, lora={"dropout": 0.1})
    train_in_process(ref_cfg)

    cfg_path = make_run(tmp_path / "killed", tiny_llama_dir, train=train, lora={"dropout": 0.1})
    run_dir = tmp_path / "killed" / "run"
    _prepared_run_json(run_dir)
    proc = _launch(cfg_path)
    _wait_for_step(run_dir, 11, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train" / "adapter").exists()
    resumed = _launch(cfg_path, "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from step-" in out

    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, 31)), "the metrics log has gaps or repeats"
    ref_losses = [r["loss"] for r in metrics(tmp_path / "ref" / "run")]
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx(ref_losses, rel=1e-6)
    assert_same_adapter(adapter(run_dir), adapter(tmp_path / "ref" / "run"), atol=1e-6)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_0(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg_path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 400})
    run_dir = tmp_path / "run"
    _prepared_run_json(run_dir)
    proc = _launch(cfg_path)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    last_step = metrics(run_dir)[-1]["step"]
    ckpts = sorted((run_dir / "train" / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name == f"step-{last_step:08d}" and (ckpts[-1] / "COMPLETE").is_file()
    assert not (run_dir / "train" / "run.json").exists(), "a stopped stage must not look finished"


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from medtune.errors import RunDirError

    cfg_path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 2})
    train_in_process(cfg_path)
    cfg = load_config(cfg_path, {"train.lr": 1e-4})
    with pytest.raises(RunDirError, match="another config"):
        run_train(cfg, cfg.output.dir / "prepare", cfg.output.dir / "train", resume=True)

    from medtune.train.checkpoint import resumable_checkpoint

    root = cfg.output.dir / "train" / "checkpoints"
    with pytest.raises(RunDirError, match="by 1 process"):  # another world size deals out other rows
        resumable_checkpoint(root, cfg.config_hash(), world_size=2, force=True)
    path, state = resumable_checkpoint(root, load_config(cfg_path).config_hash(), 1, force=False)
    assert path.name == "step-00000002" and state.step == 2 and state.world_size == 1


def _torchrun(cfg_path: Path, nproc: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "medtune",
        "train",
        str(cfg_path),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.distributed
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fsdp2_two_ranks_match_a_single_process(tmp_path: Path, tiny_llama_dir: Path, quant: str) -> None:
    """Same global batch (2 rows x 2 ranks vs 4 rows x 1): the loss curves agree within 1e-4 relative."""
    quantization = {"mode": quant}
    single = make_run(
        tmp_path / "single",
        tiny_llama_dir,
        quantization=quantization,
        train={"max_steps": 20, "micro_batch_size": 4},
    )
    fsdp = make_run(
        tmp_path / "fsdp",
        tiny_llama_dir,
        quantization=quantization,
        train={"max_steps": 20, "micro_batch_size": 2},
    )
    for run_dir in (tmp_path / "single" / "run", tmp_path / "fsdp" / "run"):
        _prepared_run_json(run_dir)
    _torchrun(single, 1)
    _torchrun(fsdp, 2)
    a, b = metrics(tmp_path / "single" / "run"), metrics(tmp_path / "fsdp" / "run")
    assert len(a) == len(b) == 20
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])
    assert a[-1]["loss"] < a[0]["loss"]
    assert_same_adapter(adapter(tmp_path / "single" / "run"), adapter(tmp_path / "fsdp" / "run"), atol=1e-4)


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from medtune.errors import MedtuneError

    try:
        import torch.utils.tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    cfg_path = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 1, "tensorboard": True})
    with pytest.raises(MedtuneError, match="pip install tensorboard"):
        train_in_process(cfg_path)


RECORD_DROPOUT_RNG = """
import hashlib, os, sys
import torch
from medtune.config import load_config
from medtune.train import run_train

seen = []
plain_forward = torch.nn.Dropout.forward


def recording_forward(self, x):
    if not seen:  # the random state the first dropout mask of the run is drawn from
        seen.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    return plain_forward(self, x)


torch.nn.Dropout.forward = recording_forward
cfg = load_config(sys.argv[1])
run_train(cfg, cfg.output.dir / "prepare", cfg.output.dir / "train")
(cfg.output.dir / f"dropout-rng-rank{os.environ['RANK']}.txt").write_text(seen[0])
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_ranks_draw_different_dropout_masks(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Identical LoRA init on both ranks (the parity test above), but each rank its own dropout stream."""
    cfg_path = make_run(tmp_path, tiny_llama_dir, lora={"dropout": 0.1}, train={"max_steps": 1})
    script = tmp_path / "record_dropout_rng.py"
    script.write_text(RECORD_DROPOUT_RNG)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*cmd, str(script), str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    states = [(tmp_path / "run" / f"dropout-rng-rank{r}.txt").read_text() for r in (0, 1)]
    assert states[0] != states[1], "both ranks drew their dropout masks from the same random state"


QUARTER_COS = (1 + math.sqrt(0.5)) / 2  # 0.5 * (1 + cos(pi / 4))


@pytest.mark.parametrize(
    ("scheduler", "warmup", "want"),
    [
        ("constant", 2, [1 / 3, 2 / 3, 1, 1, 1, 1]),
        ("linear", 2, [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25]),
        ("cosine", 2, [1 / 3, 2 / 3, 1, QUARTER_COS, 0.5, 1 - QUARTER_COS]),
        (
            "cosine",
            0,
            [1, (1 + math.cos(math.pi / 6)) / 2, 0.75, 0.5, 0.25, 1 - (1 + math.cos(math.pi / 6)) / 2],
        ),
        ("linear", 0, [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
    ],
)
def test_lr_schedule_at_every_step(scheduler: str, warmup: int, want: list[float]) -> None:
    """The lr of each of 6 steps: warmup climbs (step + 1) / (warmup + 1), so step 0 already learns
    (transformers' schedules start warmup at lr 0), then the decay reaches 0 after the last step."""
    from medtune.config import TrainConfig
    from medtune.train.optim import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    schedule = build_scheduler(TrainConfig(lr=2.0, warmup_steps=warmup, scheduler=scheduler), optimizer, 6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([2.0 * f for f in want], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        0.0 if scheduler != "constant" else 2.0, abs=1e-12
    )


@pytest.mark.parametrize(("mbs", "accum", "world"), [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4), (3, 2, 2)])
def test_every_split_of_a_global_batch_trains_on_its_rows_once(mbs: int, accum: int, world: int) -> None:
    """micro_batch_rows deals a global batch out over accumulation steps and ranks: whatever the
    split, every row is trained on exactly once (the accumulation and FSDP parity tests rest on it)."""
    from medtune.train.data import micro_batch_rows
    from medtune.train.distributed import DistInfo

    window = [[i] for i in range(mbs * accum * world)]
    taken = [
        row
        for rank in range(world)
        for i in range(accum)
        for row in micro_batch_rows(window, i, mbs, DistInfo(rank, world, rank, torch.device("cpu")))
    ]
    assert sorted(taken) == window


def test_step_rows_walk_each_epochs_plan_in_order() -> None:
    from medtune.config import PackingConfig, TrainConfig
    from medtune.packing import build_rows
    from medtune.train.data import StepRows

    lengths, packing = [5] * 10, PackingConfig(mode="padded", max_seq_len=16)
    rows = StepRows(lengths, packing, TrainConfig(micro_batch_size=2, grad_accum=2, epochs=2), 7, 1)
    assert (rows.steps_per_epoch, rows.total_steps) == (3, 6)
    epochs = [build_rows(lengths, packing, 7, e) for e in (0, 1)]
    assert epochs[0] != epochs[1]
    got = [rows.window(step) for step in range(6)]
    want = [(e, epochs[e][k * 4 : (k + 1) * 4]) for e in (0, 1) for k in range(3)]
    assert got == want
