"""Student and teacher prompts: the problem as a user message, chat-templated by the model's tokenizer.

The student sees one user message: a coding-expert instruction, the problem, its starter code or function
to complete, and the request for a ```python block (the reference puts the instruction in the user message,
with no system message, and so do we). The teacher sees the text built in trainer/contexts.py, whose
`{prompt}` is this same user message.

The user message is text, never markup: it embeds what rollouts and files hold (problem statements, own and
peer solutions, a program's feedback, hints), and text such as ``<|im_end|><|im_start|>`` printed by a
program, or spelled out of ordinary tokens by a response, would otherwise be tokenized as the chat template's
control tokens and write turns into the teacher's context. So only the template's own text is tokenized with
the tokenizer's added tokens; the user message is tokenized as plain text (`plain_text_ids`) and put in
the template's user slot, with every surrogate code point replaced (`sandbox.feedback.as_text`).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from sandbox.feedback import as_text
from sandbox.problems import Problem
from trainer.errors import PromptTooLongError


STUDENT_INSTRUCTION = (
    "You are a coding expert. You will be given a programming problem; write a correct Python program that "
    "meets the specification and passes all tests within the time limit. You may first outline your "
    "reasoning. End your answer with the complete program in one ```python code block."
)
STDIN_NOTE = "Read the input from standard input and print the answer to standard output."
STARTER_NOTE = "Your solution must use this starter code:"
COMPLETION_NOTE = (
    "Complete the following function. Keep its signature and docstring; write the whole completed function "
    "(with any imports it needs) in the code block."
)


class CuttableText(Protocol):
    """A teacher's user message and the (start, end) character spans truncation may cut (contexts.TeacherContext)."""

    text: str
    cuttable: tuple[tuple[int, int], ...]


def _is_completion(problem: Problem) -> bool:
    """HumanEval-style problems: the prompt is itself the code to complete (signature + docstring)."""
    return problem.source == "humaneval"


def student_prompt_text(problem: Problem) -> str:
    """The student's user message for `problem` (also the teacher's `{prompt}`)."""
    parts = [STUDENT_INSTRUCTION]
    if _is_completion(problem):
        code = problem.starter_code.strip() or problem.prompt.strip("\n")
        parts.append(f"{COMPLETION_NOTE}\n```python\n{code}\n```")
        return "\n\n".join(parts)
    parts.append(problem.prompt.strip())
    if problem.starter_code.strip():
        parts.append(f"{STARTER_NOTE}\n```python\n{problem.starter_code.strip()}\n```")
    elif problem.tests and all(t.kind == "stdin" for t in problem.tests):
        parts.append(STDIN_NOTE)
    elif problem.func_name:
        parts.append(f"Write a function named `{problem.func_name}`.")
    return "\n\n".join(parts)


def _template_knows_thinking(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default", "")
    return isinstance(template, str) and "enable_thinking" in template


# Stands for the user message while the template is rendered: the template's own text is what surrounds it.
_USER_SLOT = "\x00opsd-user-message\x00"


def _template_parts(tokenizer: Any, thinking: bool) -> tuple[str, str]:
    """The chat template's text before and after one user message (with the assistant's generation prompt)."""
    kwargs = {"enable_thinking": thinking} if _template_knows_thinking(tokenizer) else {}
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _USER_SLOT}], tokenize=False, add_generation_prompt=True, **kwargs)
    if text.count(_USER_SLOT) != 1:
        raise ValueError("the tokenizer's chat template does not insert a user message once and unchanged")
    head, tail = text.split(_USER_SLOT)
    return head, tail


def chat_text(tokenizer: Any, user_text: str, *, thinking: bool = False) -> str:
    """`user_text` as one user turn rendered by the tokenizer's chat template, ending with the assistant's
    generation prompt. `enable_thinking` is passed only to templates that read it (Qwen3-style)."""
    head, tail = _template_parts(tokenizer, thinking)
    return head + as_text(user_text) + tail


def chat_prompt_ids(tokenizer: Any, user_text: str, *, thinking: bool = False) -> list[int]:
    """Token ids of `chat_text`: the template's text as the tokenizer reads it (its control tokens; the
    template already holds any BOS token, so none is added), the user message as plain text."""
    head, tail = _template_parts(tokenizer, thinking)
    return _template_ids(tokenizer, head) + plain_text_ids(tokenizer, user_text) + _template_ids(tokenizer, tail)


def _template_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


# Per tokenizer, its tokenizer without control tokens (building one takes ~0.4 s for a 50k vocabulary).
_PLAIN: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _is_control(token: Any) -> bool:
    """An added token is a control token unless it is whitespace (as GPT-NeoX-style tokenizers add)."""
    content = getattr(token, "content", None) if not isinstance(token, dict) else token.get("content")
    return bool(str(content).strip())


def plain_text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` read as plain text: by the tokenizer's vocabulary alone, never as one of its added
    tokens (special or not: ``<|im_end|>``, ``<think>``, ``<tool_call>``...), whatever the text spells.

    A fast tokenizer's pipeline (normalizer, pre-tokenizer, model) is run without its added tokens; a slow one
    is asked to split special tokens; an id of a control token in the result is an error, never a prompt."""
    text = as_text(text)
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if backend is not None:
        plain = _PLAIN.get(tokenizer)
        if plain is None:
            from tokenizers import Tokenizer

            spec = json.loads(backend.to_str())
            spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if not _is_control(t)]
            plain = _PLAIN[tokenizer] = Tokenizer.from_str(json.dumps(spec))
        ids = plain.encode(text, add_special_tokens=False).ids
    elif added:
        ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    else:  # a tokenizer without added tokens: its own reading is plain
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    control = {i for i, t in added.items() if _is_control(t)}
    if control.intersection(ids):
        raise ValueError("the tokenizer cannot read this text as plain text: it made control tokens of it")
    return list(ids)


def student_prompt_ids(tokenizer: Any, problem: Problem, *, max_tokens: int | None = None,
                       thinking: bool = False) -> list[int]:
    """The student's chat-templated prompt; raises PromptTooLongError beyond `max_tokens`."""
    ids = chat_prompt_ids(tokenizer, student_prompt_text(problem), thinking=thinking)
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLongError(
            f"problem {problem.id}: the prompt has {len(ids)} tokens, more than rollout.max_prompt_tokens="
            f"{max_tokens}; raise the limit or drop long problems")
    return ids


def drop_long_prompts(problems: Sequence[Problem], tokenizer: Any, *, max_tokens: int,
                      thinking: bool = False) -> tuple[list[Problem], dict[str, Any]]:
    """Problems whose student prompt fits `max_tokens`, and metrics naming the ones skipped."""
    kept, skipped = [], []
    for problem in problems:
        n = len(chat_prompt_ids(tokenizer, student_prompt_text(problem), thinking=thinking))
        (kept if n <= max_tokens else skipped).append(problem)
    return kept, {"data/prompts_skipped_too_long": len(skipped), "data/skipped_ids": [p.id for p in skipped]}


def _water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """How many tokens each part keeps so the total is at most `budget`, cutting the longest parts first:
    every part keeps min(length, cap) for the largest cap that fits, leftover tokens go to the first long ones."""
    if sum(lengths) <= budget:
        return list(lengths)
    budget = max(budget, 0)
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest cap with sum(min(l, cap)) <= budget
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    keep = [min(n, lo) for n in lengths]
    spare = budget - sum(keep)
    for i, n in enumerate(lengths):
        if spare and n > keep[i]:
            keep[i] += 1
            spare -= 1
    return keep


def teacher_prompt_ids(
    tokenizer: Any,
    teacher_text: CuttableText | str,
    *,
    max_tokens: int,
    truncation: str,
    thinking: bool = False,
) -> tuple[list[int], dict[str, int]]:
    """The self-teacher's chat-templated prompt, at most `max_tokens` long.

    An over-long prompt is shortened by cutting only the privileged parts (`TeacherContext.cuttable`: the
    inserted solutions, feedback, hints), longest first, each from its start (`truncation='left'`, keeping
    its end, where a solution's code usually is) or from its end ('right'). The problem, the fixed wording
    and the chat template stay intact. A plain string has nothing cuttable. Raises PromptTooLongError when
    even the prompt without privileged text does not fit.
    Returns (ids, metrics) with the prompt length and the number of privileged tokens cut.
    """
    if isinstance(teacher_text, str):
        text, spans = teacher_text, ()
    else:
        text, spans = teacher_text.text, teacher_text.cuttable
    ids = chat_prompt_ids(tokenizer, text, thinking=thinking)
    if len(ids) <= max_tokens:
        return ids, {"teacher_prompt_tokens": len(ids), "teacher_prompt_cut_tokens": 0}
    if not spans:
        raise PromptTooLongError(
            f"the teacher prompt has {len(ids)} tokens, more than context.max_teacher_prompt_tokens={max_tokens}, "
            "and no privileged part to cut")
    if truncation not in ("left", "right"):
        raise ValueError(f"truncation must be 'left' or 'right', not {truncation!r}")
    span_ids = [plain_text_ids(tokenizer, text[a:b]) for a, b in spans]
    total = sum(len(s) for s in span_ids)
    budget = total - (len(ids) - max_tokens)
    # Re-tokenising the shortened text can merge or split tokens at the cut, so check and shrink again.
    for _ in range(16):
        keep = _water_fill([len(s) for s in span_ids], max(budget, 0))
        pieces, end = [], 0
        for (a, b), s, k in zip(spans, span_ids, keep):
            kept = s[len(s) - k:] if truncation == "left" else s[:k]
            pieces += [text[end:a], tokenizer.decode(kept, skip_special_tokens=False) if k else ""]
            end = b
        pieces.append(text[end:])
        ids = chat_prompt_ids(tokenizer, "".join(pieces), thinking=thinking)
        if len(ids) <= max_tokens:
            return ids, {"teacher_prompt_tokens": len(ids), "teacher_prompt_cut_tokens": total - sum(keep)}
        if budget <= 0:
            break
        budget = min(budget, sum(keep)) - (len(ids) - max_tokens)
    raise PromptTooLongError(
        f"the teacher prompt does not fit context.max_teacher_prompt_tokens={max_tokens} even without its "
        f"privileged part ({len(ids)} tokens); raise the limit")
