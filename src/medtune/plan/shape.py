"""The shape of a decoder-only transformer, read from its `config.json`: all the planner needs of a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import ModelError


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    norms_per_layer: int = 2  # Gemma 3: input, post-attention, pre- and post-feedforward
    qk_norm: bool = False  # Gemma 3 normalises q and k per head

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer: what 'all-linear' LoRA targets and bnb quantises."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    def small_params_per_layer(self) -> int:
        """Norm weights and biases: never quantised, kept in the compute dtype."""
        n = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        if self.attention_bias:
            n += (self.heads + 2 * self.kv_heads) * self.head_dim
        return n

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        per_layer = self.linear_params_per_layer() + self.small_params_per_layer()
        return embed + self.layers * per_layer + self.hidden


def model_shape(model_config: dict[str, Any]) -> ModelShape:
    """Read the memory-relevant numbers, filling keys a hub config omits from transformers' defaults.

    A Gemma 3 multimodal config is reduced to its `text_config`: medtune trains the language model
    only and never loads the vision tower.
    """
    raw = model_config.get("text_config") or model_config
    model_type = raw.get("model_type") or ("gemma3_text" if "text_config" in model_config else "llama")
    full = {**_transformers_defaults(model_type, raw), **raw}
    if full.get("num_local_experts") or full.get("num_experts"):
        raise ModelError(f"{model_type}: mixture-of-experts models are not supported by the planner")
    try:
        heads = int(full["num_attention_heads"])
        hidden = int(full["hidden_size"])
        return ModelShape(
            model_type=model_type,
            hidden=hidden,
            layers=int(full["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(full.get("num_key_value_heads") or heads),
            head_dim=int(full.get("head_dim") or hidden // heads),
            intermediate=int(full["intermediate_size"]),
            vocab=int(full["vocab_size"]),
            tied=bool(full.get("tie_word_embeddings", model_type.startswith("gemma"))),
            attention_bias=bool(full.get("attention_bias", model_type.startswith("qwen2"))),
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            qk_norm=model_type.startswith(("gemma3", "qwen3")),
        )
    except KeyError as exc:
        raise ModelError(f"model config ({model_type}) lacks {exc.args[0]!r}; cannot plan memory") from None


def _transformers_defaults(model_type: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The architecture's config class defaults (hub configs leave defaults out)."""
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type](**raw).to_dict()
    except Exception:  # unknown type or a config class that rejects the dict: plan from the raw keys
        return {}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """`config.json` from a model directory or the file itself."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ModelError(f"{path}: no config.json to plan from")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from None


def as_shape(model_config: dict[str, Any] | ModelShape) -> ModelShape:
    """Parse once, plan many times: the searches call the planner with a shape, not a dict."""
    return model_config if isinstance(model_config, ModelShape) else model_shape(model_config)
