"""Packing (prompt, response) pairs into padded tensors, and reading the response positions' outputs back.

Student and teacher see the same response tokens after different prompts. Each row is `prompt + response`,
right-padded; the logits (and the last hidden state) that predict response token t of row i sit at position
len(prompt_i) - 1 + t. `response_logits` gathers them into [B, R, V] (or [B, R, H]) aligned across rows, so
the two sides line up token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class PackedBatch:
    """input_ids, attention_mask: [B, L]; response_ids, response_mask: [B, R]; prompt_lengths: [B]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: torch.Tensor


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
         device: str | torch.device = "cpu") -> PackedBatch:
    """Right-padded rows of prompt + response. Empty prompts are refused (nothing would predict token 0)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack needs as many prompts as responses, at least one ({len(prompts)} vs {len(responses)})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    width = max(max(len(r) for r in responses), 1)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    response_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = list(prompt) + list(response)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        if response:
            response_ids[i, : len(response)] = torch.tensor(list(response), dtype=torch.long)
            response_mask[i, : len(response)] = True
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return PackedBatch(input_ids.to(device), attention_mask.to(device), response_ids.to(device),
                       response_mask.to(device), prompt_lengths.to(device))


def response_logits(logits: torch.Tensor, batch: PackedBatch, *, first_position: int = 0) -> torch.Tensor:
    """Logits (or hidden states) of packed rows → [B, R, V] (or [B, R, H]), row i's entry t predicting response
    token t.

    logits: [B, L - first_position, V], the logits of positions first_position..L-1 (all of them by default).
    Positions past a row's response (padding) point at its last position; the response mask hides them.
    """
    width = batch.response_ids.shape[1]
    offsets = torch.arange(width, device=logits.device)
    positions = batch.prompt_lengths.to(logits.device).unsqueeze(1) - 1 - first_position + offsets
    positions = positions.clamp(max=logits.shape[1] - 1)
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _forward_response_positions(forward: Callable[[int], torch.Tensor], batch: PackedBatch) -> torch.Tensor:
    """`forward(k)` computes the outputs of the last k positions; keep the response positions' [B, R, D].
    Only the positions from the shortest prompt's last token on are asked for."""
    first = int(batch.prompt_lengths.min()) - 1
    return response_logits(forward(batch.input_ids.shape[1] - first), batch, first_position=first)


def forward_response_logits(forward: Callable[..., torch.Tensor], batch: PackedBatch) -> torch.Tensor:
    """Run `forward(input_ids, attention_mask, logits_to_keep=k)` (student or teacher) and keep the response
    positions. Only the positions from the shortest prompt's last token on go through the LM head, which
    on a large vocabulary is a good part of the forward's cost and most of its memory."""
    return _forward_response_positions(
        lambda keep: forward(batch.input_ids, batch.attention_mask, logits_to_keep=keep), batch)


def forward_response_hidden(forward: Callable[..., torch.Tensor], batch: PackedBatch) -> torch.Tensor:
    """Run `forward(input_ids, attention_mask, hidden_to_keep=k)` (student or teacher `forward_hidden`) and keep
    the response positions' last hidden states [B, R, H], for a loss that applies the LM head itself."""
    return _forward_response_positions(
        lambda keep: forward(batch.input_ids, batch.attention_mask, hidden_to_keep=keep), batch)
