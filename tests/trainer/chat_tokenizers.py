"""Small local tokenizers with the chat templates and control tokens of Qwen3 and Olmo 3 (no hub here).

Each is a byte-level BPE trained in a moment on a little text, with its family's pre-tokenizer pattern, the
family's added tokens (special and not: Qwen3's ``<think>`` and ``<tool_call>`` are added tokens that are not
"special") and a chat template written after the family's published one: ChatML turns, Qwen3's empty thought
when ``enable_thinking`` is false, Olmo 3's default system message. The vocabulary is not the model's; what
the tests check (which text becomes a control token) does not depend on it.
"""

from __future__ import annotations

import functools

QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
OLMO3_SYSTEM = "You are Olmo, a helpful AI assistant built by Ai2."
OLMO3_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\n" + OLMO3_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The families' pre-tokenizer patterns (Qwen2/3's, and cl100k's, which Olmo 3's tokenizer derives from).
_QWEN_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CL100K_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

FAMILIES = {
    "qwen3": dict(
        pattern=_QWEN_PATTERN, template=QWEN3_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"],
        other=["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]),
    "olmo3": dict(
        pattern=_CL100K_PATTERN, template=OLMO3_TEMPLATE, eos="<|im_end|>", pad="<|pad|>",
        special=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        other=["<functions>", "</functions>", "<function_calls>", "</function_calls>", "<think>", "</think>"]),
}

_CORPUS = [
    "You are a coding expert. You will be given a programming problem; write a correct Python program.",
    "def solve(n):\n    return sum(range(n))\n\nprint(solve(int(input())))\n",
    "Runtime Error\nValueError: invalid literal for int() with base 10\n\nLast Executed Input\n1 2\n",
    "Correct solution:\n\n```python\nclass Solution:\n    def total(self, nums):\n        return sum(nums)\n```",
    "the quick brown fox jumps over the lazy dog <> | _ ' \" 0123456789",
]


@functools.lru_cache(maxsize=None)
def build(family: str):
    """The family's tokenizer (a transformers fast tokenizer), built once per test session."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["other"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"], pad_token=spec["pad"],
                                   chat_template=spec["template"])


def control_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's added tokens (the chat template's control tokens among them)."""
    return {i for i, t in tokenizer.added_tokens_decoder.items() if str(t.content).strip()}
