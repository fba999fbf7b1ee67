"""Stand-ins for vLLM in tests that need no engine process: the project's real worker extension
(trainer/vllm_worker.py) over a transformers model, and an `LLM` that records the engine's calls.

`FakeWorker.model_runner.reload_weights` copies the named tensors into its model the way vLLM's reload does
for an unquantized model, recording each call; `rpc_to(worker)` calls the worker the way `LLM.collective_rpc`
calls every worker of an engine.
"""

from __future__ import annotations

import torch

from trainer.vllm_worker import WeightSyncExtension

LAYER_PARTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight")


def tiny_model(seed: int, *, tied: bool = True, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


class FakeRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: list[list[tuple[str, torch.Tensor]]] = []

    def get_model(self) -> torch.nn.Module:
        return self.model

    def reload_weights(self, weights_iterator) -> None:
        batch = list(weights_iterator)
        self.calls.append(batch)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in batch:
                params[name].copy_(tensor)


class FakeWorker(WeightSyncExtension):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model_runner = FakeRunner(model)


def rpc_to(worker: FakeWorker, log: list[str] | None = None):
    """`collective_rpc` of a one-worker engine; `log` collects the method names called."""

    def rpc(method: str, args: tuple = ()) -> list:
        if log is not None:
            log.append(method)
        return [getattr(worker, method)(*args)]
    return rpc


class FakeLLM:
    """Records the engine's calls to vLLM; `collective_rpc` reaches one worker extension."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.worker = FakeWorker(tiny_model(0))
        self.llm_engine = self  # close() reaches engine_core.shutdown()
        self.engine_core = self

    def get_tokenizer(self):
        return None

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append(("rpc", method))
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
