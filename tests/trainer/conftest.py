"""Fixtures shared by the trainer tests.

`tiny_model_dir`: a random 2-layer Llama (hidden 64, head_dim 32, tied embeddings, float32) with the SmolLM2
tokenizer and chat template, built once per test session into a temporary folder. Both transformers and
vLLM load it; tests that change weights must copy it first (it is shared).

`tiny_qwen3_dir`: a random 2-layer Qwen3 (head_dim 128, float32) with a BPE tokenizer trained on HumanEval and
ChatML's template: it needs neither the embedded GGUF file nor a hub, so the tests that also run on a GPU
install (where neither is) use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM's CPU backend refuses to start without a KV cache size (GiB); the engine sets it too.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# The second device of the placement tests must exist before the process's first backward: autograd sizes its
# per-device queues then, and a device registered later has none (an internal assert in the backward).
import tests.trainer.second_device  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    from trainer.models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model", seed=0, dtype="float32")
