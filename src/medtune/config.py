"""The run config: one pydantic model per YAML section, and the only place defaults live.

Every stage receives the section(s) it needs. Loading validates the whole file before any work
starts, so a misspelled key or a string where a number belongs stops the run with the key path
and a hint (exit code 2), not an hour into training.

Past 400 lines on purpose: it is only the schema (every section, its defaults and their reasons), which
a user reads as one page; the loading steps around it are `medtune.config_load`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.config_load import explain, move_format_keys, read_yaml_config, resolve_paths, set_dotted
from medtune.errors import ConfigError

Language = Literal["ko", "en", "mixed", "other"]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    """One input file or folder and how to read it.

    `format` decides how files are read; only `auto` guesses, from the extension and the first
    rows. A file named directly is read as its declared format whatever its extension (`a.txt` with
    `format: jsonl`); a folder with a generic format reads the files of that format (`*.jsonl`,
    `*.csv`, `*.parquet`/`*.pq`...) and refuses to silently skip data files of another format.
    `json` and `jsonl` read either shape: one JSON document (a list, an object keyed by id) or one
    object per line, whichever the file holds.
    """

    path: Path
    """A file or a folder (KorMedMCQA's per-profession CSVs, MMLU's per-subject CSVs). Relative paths
    resolve against the config file's folder."""
    format: Literal[
        "auto",
        "jsonl",
        "json",
        "csv",
        "tsv",
        "parquet",
        "kormedmcqa",
        "medqa",
        "medmcqa",
        "pubmedqa",
        "mmlu",
        "genmedgpt",
    ] = "auto"
    name: str | None = None
    """Source name used in reports and per-source counts; defaults to the format or file stem."""
    split: str | None = None
    """Which split(s) to read from a folder layout (e.g. `train`, `valid`, `dev`); None reads the
    file as given."""
    language: Literal["auto", "ko", "en"] = "auto"
    fields: dict[str, str | list[str]] = Field(default_factory=dict)
    """Generic column mapping for a user's own files: question, options (a list of columns or one
    list-valued column), answer, explanation, prompt, response, id, subject."""
    limit: int | None = Field(default=None, ge=1)
    """Read at most this many records (after validation), for quick experiments."""
    header: bool | None = None
    """CSV/TSV only: whether the first row names the columns; None guesses from the first row.
    Without a header, `fields` name columns by 0-based position (`question: "0"`)."""
    answer_index_base: Literal[0, 1] = 0
    """How an integer `answer` counts options in a user's own file: 0 (0 = A) or 1 (1 = A)."""
    encoding: str = "utf-8"
    """Text encoding of CSV/TSV/JSON files, e.g. `cp949` (= euc-kr, Korean Excel) or `utf-16`; a
    UTF-8 BOM is accepted under the default. A file plainly in another encoding (most lines do not
    decode, and UTF-8, cp949 or UTF-16 reads them) is one error naming the file and that encoding;
    a few bad lines in a good file are quarantined one by one."""

    @field_validator("encoding")
    @classmethod
    def _known_text_encoding(cls, v: str) -> str:
        try:
            "".encode(v)  # also refuses codecs that are not text encodings (rot13, base64)
        except (LookupError, ValueError):
            raise ValueError(
                f"unknown text encoding {v[:40]!r} (e.g. utf-8, cp949, euc-kr, utf-16, latin-1)"
            ) from None
        return v


class DedupeConfig(Section):
    """Exact and near-duplicate removal (data/dedupe.py).

    Near-duplicate memory per record does not grow with `num_perm` x field size: shingles are
    permuted 2,048 at a time (about 1 MiB per temporary at 128 permutations); the text itself is
    bounded by `data.max_field_chars`.
    """

    exact: bool = True
    near: bool = True
    threshold: float = Field(default=0.85, gt=0, le=1)
    """Estimated Jaccard similarity of word 5-gram shingles above which two records are near duplicates."""
    num_perm: int = Field(default=128, ge=16)
    shingle_words: int = Field(default=5, ge=1)
    """Words per shingle for near-duplicate MinHash (texts shorter than this become one shingle)."""


class ContaminationConfig(Section):
    ngram: int = Field(default=13, ge=3)
    """Length in words of the question-stem n-grams compared between training and eval items."""
    action: Literal["report", "remove"] = "remove"
    recurring_stems: Literal["flag", "remove"] = "flag"
    """A training record that repeats an eval item's short stem (or nearly: character 5-gram Jaccard
    >= 0.75) with other options is a different item that teaches the same rule: `flag` lists it
    (manifest and recurring_stems.jsonl) and keeps it, `remove` also drops it from training
    (counted in `contaminated_removed`)."""
    char_ngram: int = Field(default=30, ge=8)
    """Stems with fewer than `ngram` words (most Korean stems) are compared, together with their
    options, by character n-grams of this length (spaces removed)."""


class MixConfig(Section):
    """Target language mix of the training set (the paper's finding: balance, not volume)."""

    ratio: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    """e.g. {ko: 1, en: 1}, or the paper's English-heavy {ko: 3, en: 10}; a 0 share leaves that
    language out. None keeps everything."""
    by: Literal["examples", "tokens"] = "examples"
    total: int | None = Field(default=None, ge=1)
    """Budget in examples or tokens (by `by`). None: the largest mix the data allows without up-sampling."""
    replacement: bool = False
    """Allow up-sampling (sampling with replacement) when a language has too little data for its share."""
    stratify_by: Literal["source", "subject", "none"] = "source"

    @field_validator("ratio")
    @classmethod
    def _some_language_has_a_share(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # All zeros leaves the mixer nothing to divide by; say so here, not as a crash in prepare.
        if v and not any(v.values()):
            raise ValueError("give at least one language a share above 0 (e.g. {ko: 1, en: 1})")
        return v


class DataConfig(Section):
    train: list[SourceConfig] = Field(default_factory=list)
    eval: list[SourceConfig] = Field(default_factory=list)
    mix: MixConfig = Field(default_factory=MixConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    contamination: ContaminationConfig = Field(default_factory=ContaminationConfig)
    scrub_pii: bool = True
    min_question_chars: int = Field(default=1, ge=1)
    max_field_chars: int = Field(default=100_000, ge=1)
    """Quarantine a record with any text field (question, an option, context, explanation, prompt,
    response) longer than this. The longest field in the bundled public sets is 4,671 chars (an MMLU
    reading passage); 100,000 chars is 25,000 (English) to 100,000 (Korean) tokens, past the context
    the small models here train with, and a field that long is usually a broken row (an unclosed CSV
    quote swallows the rest of the file into one cell). It also bounds the memory every later stage
    spends on one record."""


class ModelConfig(Section):
    path: Path
    """A local model directory (safetensors + config.json + tokenizer). Never a hub id: medtune is offline."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Compute dtype. auto: bfloat16 where the chip computes it natively (GPUs from Ampere on, compute
    capability >= 8.0; CPUs with amx_bf16 or avx512_bf16 flags), else float32 (emulated bf16 is slower).
    Training prints the choice. Pin float32 for runs that must match fp32 numbers exactly across
    machines. float16 is trained without loss scaling: prefer float32 on GPUs without bf16."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Load pickle `.bin` weights. Off: pickle files can run code when loaded."""


class QuantizationConfig(Section):
    mode: Literal["none", "nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = True
    quant_storage: Literal["auto", "uint8", "bfloat16", "float32"] = "auto"
    """auto: the compute dtype under FSDP (FSDP needs one dtype per flat param), else uint8."""


class LoraConfig(Section):
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)


class FormatConfig(Section):
    """How a record becomes prompt and answer text, and which tokens are trained (`medtune.format`).

    Training, evaluation, held-out NLL and `medtune chat` all render through these settings, so a
    model is scored and talked to in the format it was trained on. These keys used to live under
    `packing:`; that spelling is still read (with a note) and hashes the same.
    """

    template: Literal["auto", "chat", "plain"] = "auto"
    """auto: the tokenizer's chat template when it has one, else medtune's plain template."""
    prompt_language: Literal["auto", "ko", "en"] = "auto"
    """Wording of the instruction: by each record's language (auto) or fixed."""
    train_on_prompt: bool = False
    """Also train on the prompt's tokens; off: only the answer (and end-of-turn marker) is trained."""
    include_explanation: bool = True
    """MCQA targets: the letter, then a newline and the explanation where the record has one."""


class PackingConfig(Section):
    """How token rows are built from examples: packing or padding, and the row length."""

    mode: Literal["packed", "padded"] = "packed"
    max_seq_len: int = Field(default=1024, ge=16)
    padding: Literal["longest", "max_length"] = "longest"
    """Padded mode only: pad each batch to its longest row, or every row to max_seq_len."""
    overlong: Literal["truncate", "drop"] = "truncate"


CHUNKED_CE_MIN_VOCAB = 32_000
"""`train.chunked_ce: auto` chunks the loss from this vocabulary size on (Llama 3's 128k, Gemma's 262k):
below it full logits are cheap. The loss, the planner and the bench read this one number."""


class TrainConfig(Section):
    epochs: float = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    micro_batch_size: int = Field(default=1, ge=1)
    """Rows per forward pass per rank."""
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = True
    checkpoint_every_k_layers: int = Field(default=1, ge=1)
    activation_offload: bool = False
    chunked_ce: Literal["auto", "on", "off", "liger", "cce"] = "auto"
    """auto: chunked cross-entropy when the vocabulary is large (>= 32k), so full logits never exist.
    liger / cce: the fused Triton kernels (`pip install medtune[fused]`, CUDA; cce needs bf16/fp16)."""
    ce_chunk_size: int = Field(default=256, ge=16)
    """Tokens per cross-entropy chunk: 256 tokens x 262k vocab is one 256 MiB fp32 block."""
    save_every: int | None = Field(default=None, ge=1)
    """Checkpoint every N optimizer steps (None: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    max_bad_steps: int = Field(default=5, ge=1)
    """Stop after this many non-finite losses in a row."""
    tensorboard: bool = False


class DistributedConfig(Section):
    """How many processes train, on how many machines (docs/distributed.md)."""

    nproc: int = Field(default=1, ge=1)
    """Processes (GPUs) per node; >1 makes `medtune train` re-launch itself under torchrun."""
    nnodes: int = Field(default=1, ge=1)
    """Machines in the job. >1 needs `rdzv_endpoint` and this machine's `node_rank`, and
    `output.dir` on storage every node sees (checkpoints are written shard by shard by every rank)."""
    node_rank: int = Field(default=0, ge=0)
    """This machine's index, 0..nnodes-1 (a launch detail: not part of the config hash)."""
    rdzv_endpoint: str | None = None
    """HOST:PORT where the nodes meet (torchrun's c10d rendezvous), usually node 0's address."""
    rdzv_id: str = "medtune"
    """Job id of the rendezvous: nodes with the same endpoint and id form one job."""
    timeout_s: int = Field(default=1800, ge=10)
    """How long a rank waits for the others in one collective before it fails instead of hanging."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    @model_validator(mode="after")
    def _multi_node_needs_a_meeting_point(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (HOST:PORT of node 0)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        return self


class GuardRule(Section):
    """One protected group of the forgetting guard and the largest regression against the base it allows.

    Give `max_drop_pp` for accuracy or `max_nll_increase` for held-out NLL; `metric` follows from which
    one is given (0 when neither: any significant regression fails).
    """

    group: str
    """A group name as the eval tables spell it: `all`, `language=en`, `source=medqa`, `tag=medical_law`."""
    metric: Literal["accuracy", "nll"] | None = None
    max_drop_pp: float | None = Field(default=None, ge=0)
    """Accuracy: the check fails when tuned - base is below -max_drop_pp and McNemar's exact p < 0.05."""
    max_nll_increase: float | None = Field(default=None, ge=0)
    """Held-out NLL (needs `eval.nll`): fails when the whole paired 95% CI of tuned - base (nats/token)
    lies above this."""

    @model_validator(mode="after")
    def _one_limit(self) -> GuardRule:
        if self.max_drop_pp is not None and self.max_nll_increase is not None:
            raise ValueError("give max_drop_pp (accuracy) or max_nll_increase (nll), not both")
        if self.metric is None:
            self.metric = "nll" if self.max_nll_increase is not None else "accuracy"
        elif self.metric == "nll" and self.max_drop_pp is not None:
            raise ValueError("max_drop_pp is for metric accuracy; use max_nll_increase with metric nll")
        elif self.metric == "accuracy" and self.max_nll_increase is not None:
            raise ValueError("max_nll_increase is for metric nll; use max_drop_pp with metric accuracy")
        return self

    @property
    def allowed(self) -> float:
        """The allowed regression in the metric's unit (pp or nats/token)."""
        limit = self.max_drop_pp if self.metric == "accuracy" else self.max_nll_increase
        return limit or 0.0


class EvalConfig(Section):
    mode: Literal["letter", "loglik", "generate"] = "letter"
    k_shot: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    max_items: int | None = Field(default=None, ge=1)
    """Score at most this many items per eval source (for quick runs)."""
    max_new_tokens: int = Field(default=32, ge=1)
    eval_base: bool = True
    """Also score the base model, so the report shows what fine-tuning changed."""
    nll: bool = False
    """Also score the held-out NLL of every eval record (MCQA text, instruction responses), per group,
    and tuned vs base paired per item: it moves where accuracy cannot (`medtune.evaluate.nll`)."""
    nll_scope: Literal["targets", "text"] = "targets"
    """targets: the tokens the training loss scores (a held-out validation loss); text: an MCQA item's
    whole question + options + answer (its answer alone is one letter), instruction records' responses."""
    bootstrap_samples: int = Field(default=2000, ge=100)
    group_by: list[Literal["language", "source", "subject"]] = Field(
        default_factory=lambda: ["language", "source", "subject"]
    )
    group_by_tags: bool = True
    """Also report each derived tag (e.g. `medical_law`) as a group."""
    fewshot_split: Literal["train"] = "train"
    """Prepared split the k-shot examples come from; never the eval split, so no item sees itself
    or a sibling eval item as an example."""
    guard: list[GuardRule] = Field(default_factory=list)
    """The forgetting guard: protected groups and the regression against the base each allows. `medtune
    eval` records the verdict in eval/guard.json; `medtune export` refuses a failed model unless --force.
    Not part of the config hash: changing a verdict rule re-judges, it does not re-run."""

    @model_validator(mode="after")
    def _nll_guard_needs_nll(self) -> EvalConfig:
        if not self.nll and any(rule.metric == "nll" for rule in self.guard):
            raise ValueError(
                "a guard rule on nll needs `eval.nll: true` (held-out NLL is not scored otherwise)"
            )
        return self


class SweepConfig(Section):
    """What `medtune sweep` recommends (the same as its --target/--protect/--margin/--metric flags).

    Not part of the config hash: changing the question asked of a sweep must not re-run its cells.
    """

    target: str | None = None
    """The group to do best on, e.g. `language=ko`; None: tables only, no recommendation."""
    protect: list[str] = Field(default_factory=list)
    """Groups no recommended ratio may significantly harm against the base beyond `margin`."""
    margin: float = Field(default=0.0, ge=0)
    """Allowed harm on a protected group: pp of accuracy, or nats/token of NLL (by `metric`)."""
    metric: Literal["accuracy", "nll"] = "accuracy"
    """accuracy (percent, per item right/wrong) or held-out nll (needs `eval.nll: true`)."""


class OutputConfig(Section):
    dir: Path = Path("runs/default")


class RunConfig(Section):
    """A whole medtune run. `seed` feeds every RNG in every stage."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    packing: PackingConfig = Field(default_factory=PackingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _format_keys_moved_out_of_packing(cls, raw: Any) -> Any:
        return move_format_keys(raw, list(FormatConfig.model_fields))

    @model_validator(mode="after")
    def _needs_training_data(self) -> RunConfig:
        if not self.data.train and not self.data.eval:
            raise ValueError("data: give at least one source under data.train or data.eval")
        return self

    @model_validator(mode="after")
    def _nll_advice_needs_nll(self) -> RunConfig:
        if self.sweep.target and self.sweep.metric == "nll" and not self.eval.nll:
            raise ValueError("sweep.metric nll needs `eval.nll: true` (held-out NLL is not scored otherwise)")
        return self

    @field_validator("seed")
    @classmethod
    def _seed_fits_numpy(cls, v: int) -> int:
        if not 0 <= v < 2**32:
            raise ValueError("seed must be in [0, 2**32)")
        return v

    def config_hash(self) -> str:
        """Hash of the resolved config, for manifests and for refusing a stale checkpoint.

        Verdict rules (`eval.guard`, `sweep`) are left out: they judge finished stages, never change
        what a stage writes, and editing them must not make a sweep re-train its cells. So are the
        launch details that differ between the nodes of one job (`node_rank`, the rendezvous).
        """
        launch = {"node_rank", "rdzv_endpoint", "rdzv_id", "timeout_s"}
        verdicts = {"sweep": True, "eval": {"guard"}}
        dumped = self.model_dump(mode="json", exclude={**verdicts, "distributed": launch})
        # `format:` is hashed under packing, where its keys lived before: earlier runs keep their hash.
        dumped["packing"] = {**dumped["packing"], **dumped.pop("format")}
        blob = json.dumps(dumped, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, resolve and validate a YAML run config.

    Relative paths (data sources, model, output dir) resolve against the config file's folder, so a
    config works from any working directory. `overrides` maps dotted keys to values (`train.lr`).
    """
    path = Path(path)
    raw = read_yaml_config(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    cfg = validate_config(raw, where=str(path))
    try:
        return resolve_paths(cfg, path.resolve().parent)
    except (OSError, ValueError) as exc:  # a NUL byte (ValueError), a name too long for the OS
        name = f" {str(exc.filename)[:80]!r}" if getattr(exc, "filename", None) else ""
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{path}: a path in the config cannot be used{name}: {reason}") from None


def validate_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(explain(exc, where, RunConfig)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default spelled out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
