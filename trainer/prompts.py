"""Student and teacher prompts: the problem as a user message, chat-templated by the model's tokenizer.

The student sees one user message: a coding-expert instruction, the problem, its starter code or function
to complete, and the request for a ```python block (the reference puts the instruction in the user message,
with no system message, and so do we). The teacher sees the text built in trainer/contexts.py, whose
`{prompt}` is this same user message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

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


def chat_text(tokenizer: Any, user_text: str, *, thinking: bool = False) -> str:
    """`user_text` as one user turn rendered by the tokenizer's chat template, ending with the assistant's
    generation prompt. `enable_thinking` is passed only to templates that read it (Qwen3-style)."""
    kwargs = {"enable_thinking": thinking} if _template_knows_thinking(tokenizer) else {}
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True, **kwargs)


def chat_prompt_ids(tokenizer: Any, user_text: str, *, thinking: bool = False) -> list[int]:
    """Token ids of `chat_text` (the template already holds any BOS token, so none is added)."""
    return list(tokenizer(chat_text(tokenizer, user_text, thinking=thinking), add_special_tokens=False)["input_ids"])


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
    span_ids = [list(tokenizer(text[a:b], add_special_tokens=False)["input_ids"]) for a, b in spans]
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
