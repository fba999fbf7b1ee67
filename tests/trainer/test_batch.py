"""Packing (prompt, response) rows and reading back the logits that predict each response token."""

from __future__ import annotations

import pytest
import torch

from trainer.batch import forward_response_logits, pack, response_logits


def test_pack_right_pads_rows_and_marks_responses():
    batch = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.response_ids.tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.prompt_lengths.tolist() == [3, 1]


def test_pack_refuses_empty_prompts_and_mismatched_lists():
    with pytest.raises(ValueError):
        pack([[]], [[1]], pad_id=0)
    with pytest.raises(ValueError):
        pack([[1]], [[1], [2]], pad_id=0)


def test_response_logits_pick_the_position_before_each_response_token():
    prompts, responses = [[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11], []]
    batch = pack(prompts, responses, pad_id=0)
    B, L, V = batch.input_ids.shape[0], batch.input_ids.shape[1], 4
    logits = torch.randn(B, L, V)
    got = response_logits(logits, batch)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for t in range(len(r)):  # logits at position len(p) - 1 + t predict response token t
            assert torch.equal(got[i, t], logits[i, len(p) - 1 + t])


def test_forward_with_logits_to_keep_equals_the_full_forward():
    """The shortened LM head gives the same response logits as the full one, on a real causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()

    def forward(input_ids, attention_mask, logits_to_keep=0):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep).logits

    batch = pack([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], [[11, 12], [13, 14, 15, 16], [17]], pad_id=0)
    with torch.no_grad():
        full = response_logits(forward(batch.input_ids, batch.attention_mask), batch)
        kept = forward_response_logits(forward, batch)
    assert torch.allclose(kept, full, atol=1e-6)
    assert kept.shape == (3, 4, 50)
