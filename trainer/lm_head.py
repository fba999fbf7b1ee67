"""A causal LM split at its LM head: the last hidden states of a forward, and the head's weights.

The fused loss (trainer/head_loss.py) applies the head itself, a chunk of positions at a time, so the
student's and the teacher's forwards stop at the hidden states the head would have read: the decoder's
output (`model.get_decoder()`, after the final norm). `final_hidden_states` reads them with a forward hook
while the model's own forward runs, so whatever wraps the model (a DeepSpeed engine and its ZeRO hooks,
gradient checkpointing) runs as it always does; that forward is asked for the logits of one position only,
so the head costs B x V instead of B x L x V.

Heads that do more than `hidden @ weight.T + bias` (Gemma's final logit soft-capping, Cohere's logit scale)
are refused by `lm_head`: the fused loss would silently compute another distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class LMHead:
    """The LM head as tensors: logits = hidden @ weight.T + bias. weight: [V, H]; bias: [V] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def lm_head(model: nn.Module) -> LMHead:
    """The head of a Hugging Face causal LM (the live parameters: tied embeddings stay shared)."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None or hasattr(model, "logit_scale"):
        raise ValueError(f"{type(model).__name__} transforms its logits after the LM head (soft-capping or a "
                         "logit scale), which the fused loss does not; set loss.chunk_size to null")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output embeddings are a {type(head).__name__}, not a Linear; "
                         "set loss.chunk_size to null")
    return LMHead(head.weight, head.bias)


def final_hidden_states(model: nn.Module, forward: Callable[..., Any], *, keep: int = 0) -> torch.Tensor:
    """Run `forward(logits_to_keep=1)` and return what `model`'s decoder handed its LM head.

    model: the Hugging Face causal LM (unwrapped; `forward` may call it through a wrapper such as a DeepSpeed
    engine). Returns [B, L, H], or [B, keep, H] of the last `keep` positions when keep > 0. The tensor keeps
    its autograd graph when the forward builds one.
    """
    captured: list[torch.Tensor] = []

    def keep_output(_module: nn.Module, _args: Any, output: Any) -> None:
        # A ModelOutput, or a tuple from models called with return_dict=False: the last hidden state is first.
        captured.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep_output)
    try:
        forward(logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder of {type(model).__name__} ran {len(captured)} times in one forward")
    hidden = captured[0]
    return hidden[:, -keep:] if keep > 0 else hidden
