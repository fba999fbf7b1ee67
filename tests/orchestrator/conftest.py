"""The trainer tests' tiny model (a random 2-layer Llama that vLLM and transformers load) for sweep tests."""

from tests.trainer.conftest import tiny_model_dir  # noqa: F401  (a fixture, used by name)
