"""Fixtures shared by the trainer tests.

`tiny_model_dir`: a random 2-layer Llama (hidden 64, head_dim 32, tied embeddings, float32) with the SmolLM2
tokenizer and chat template, built once per test session into a temporary folder. Both transformers and
vLLM load it; tests that change weights must copy it first (it is shared).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM's CPU backend refuses to start without a KV cache size (GiB); the engine sets it too.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from trainer.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)
