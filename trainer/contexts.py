"""The self-teacher's privileged contexts: the constructions of METHOD.md section 2 and user templates.

Each rollout of a prompt group gets one teacher text. The teacher's `{prompt}` is the student's whole user
message (instruction + problem), so with the control `none` the teacher's prompt equals the student's.

`has_context` is False when a construction had nothing to add for that rollout (no peer solution and no
feedback, an accepted rollout with empty feedback, an empty hint); the trainer gives such rollouts loss 0.
The control `none` and `expert_preamble` always have context: they are a fixed change of the prompt (the
preamble's text, reconstructed from the paper's outline, is in trainer/expert_preamble.py). For
`none` that keeps the control on the exact code path of the other constructions, differing only in the
teacher's prompt, so its loss (the EMA teacher's lag behind the student, plus weight decay and numerical
noise) and its improvement measure what the pipeline does without any privileged information.

Every piece is text (`sandbox.feedback.as_text`), and the whole message is tokenized as plain text
(trainer/prompts.py `chat_prompt_ids`): feedback a program wrote, solutions, hints and a template's fields
can never become the chat template's control tokens.

Truncation (trainer/prompts.py `teacher_prompt_ids`) may shorten only the `cuttable` spans: the inserted
solution, feedback or hint, never the problem or the fixed wording. `teacher_prompts_for_group` is step 3 of
METHOD.md section 1 for one prompt group: the texts built here, chat-templated and truncated.

The context settings were validated when the config was built (trainer/config.py); nothing here checks them.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Sequence

from sandbox.feedback import as_text
from sandbox.problems import Problem
from trainer.config import ContextConfig, template_fields
from trainer.errors import ContextError
from trainer.expert_preamble import EXPERT_PREAMBLE
from trainer.options import CONTEXT_NAMES, TEMPLATE_FIELDS
from trainer.prompts import student_prompt_text, teacher_prompt_ids

__all__ = ["CONTEXT_NAMES", "TEMPLATE_FIELDS", "ContextError", "GradedRollout", "TeacherContext",
           "build_teacher_texts", "context_metrics", "needs_hints", "strip_thinking", "teacher_prompts_for_group"]

# The wording of METHOD.md section 2, laid out as the reference code lays it out (a section starts on a
# new line, its body after a blank line; the closing instruction after a blank line).
SOLUTION_HEADER = "\nCorrect solution:\n\n"
FEEDBACK_HEADER = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
OWN_FEEDBACK_HEADER = "\nFeedback:\n\n"
CLOSING = "\n\nCorrectly solve the original question."
EXPERT_SEPARATOR = "\n\n---\n\n"
EXPERT_CLOSING = "\n\nThink step by step first, then write the solution."

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass(frozen=True)
class GradedRollout:
    """One rollout of a prompt group after grading on the train tests."""

    text: str
    passed: bool
    feedback: str = ""

    @classmethod
    def from_verdict(cls, text: str, verdict: Any) -> "GradedRollout":
        """From the response text and its sandbox `Verdict` (anything with `passed` and `feedback`)."""
        return cls(text=text, passed=bool(verdict.passed), feedback=verdict.feedback or "")

    @classmethod
    def groups(cls, texts: Sequence[Sequence[str]], verdicts: Sequence[Any]) -> list[list["GradedRollout"]]:
        """Per prompt group, its rollouts with their verdicts; `verdicts` is flat, group after group."""
        flat = iter(verdicts)
        return [[cls.from_verdict(text, next(flat)) for text in group] for group in texts]


@dataclass(frozen=True)
class TeacherContext:
    """The self-teacher's user message for one rollout.

    `cuttable` holds (start, end) character spans of `text` that truncation may shorten: the privileged
    insertions (solutions, feedback, hints), never the problem or the fixed wording.
    """

    text: str
    has_context: bool
    used_peer: bool = False
    used_feedback: bool = False
    used_own_solution: bool = False
    used_hint: bool = False
    cuttable: tuple[tuple[int, int], ...] = ()


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> blocks; a response that starts inside a thought (the template opened the
    <think> tag in the prompt) loses everything up to its first </think>."""
    first_close = text.find("</think>")
    first_open = text.find("<think>")
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        text = text[first_close + len("</think>"):].lstrip()
    return _THINK_BLOCK.sub("", text)


def needs_hints(cfg: ContextConfig) -> bool:
    """Whether the construction reads a per-problem hint (trainer/hints.py)."""
    if cfg.template is not None:
        return "hint" in template_fields(cfg.template)
    return cfg.name == "llm_peer_hints"


class _Text:
    """Concatenates pieces and records which of them truncation may cut."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.length = 0

    def add(self, piece: str, *, cuttable: bool = False) -> None:
        piece = as_text(piece)  # (one character for one: the spans stay where they are)
        if cuttable and piece:
            self.spans.append((self.length, self.length + len(piece)))
        self.pieces.append(piece)
        self.length += len(piece)

    def done(self, **flags) -> TeacherContext:
        return TeacherContext(text="".join(self.pieces), cuttable=tuple(self.spans), **flags)


def _peer_solution(group: Sequence[GradedRollout], index: int) -> str | None:
    """The first successful rollout of the group other than `index`, without its thinking."""
    for j, other in enumerate(group):
        if j != index and other.passed:
            return strip_thinking(other.text)
    return None


def build_teacher_texts(
    group: Sequence[GradedRollout],
    *,
    problem: Problem,
    context: ContextConfig,
    hint: str | None = None,
    prompt: str | None = None,
) -> list[TeacherContext]:
    """One teacher context per rollout of a prompt group (all rollouts of one problem).

    `prompt` is the student's user message; by default it is built from `problem` (trainer/prompts.py).
    `hint` is the problem's hint (llm_peer_hints, or a template using {hint}).
    """
    if prompt is None:
        prompt = student_prompt_text(problem)
    if needs_hints(context) and hint is None:
        raise ContextError(f"context {context.name!r} needs a hint for problem {problem.id!r}; none was given")
    return [
        _build_one(group, i, prompt=prompt, context=context, hint=hint or "")
        for i in range(len(group))
    ]


def _build_one(group: Sequence[GradedRollout], i: int, *, prompt: str, context: ContextConfig,
               hint: str) -> TeacherContext:
    if context.template is not None:
        return _build_from_template(group, i, prompt=prompt, template=context.template, hint=hint,
                                    feedback_only_without_solution=context.feedback_only_without_solution)
    rollout = group[i]
    feedback = rollout.feedback if rollout.feedback.strip() else ""  # whitespace-only feedback is none
    out = _Text()
    name = context.name
    if name == "none":
        out.add(prompt)
        return out.done(has_context=True)
    elif name == "expert_preamble":
        out.add(EXPERT_PREAMBLE + EXPERT_SEPARATOR + prompt + EXPERT_CLOSING)
        return out.done(has_context=True)
    elif name == "feedback":
        if not feedback:
            out.add(prompt)
            return out.done(has_context=False)
        out.add(prompt + FEEDBACK_HEADER)
        out.add(feedback, cuttable=True)
        out.add(CLOSING)
        return out.done(has_context=True, used_feedback=True)
    elif name == "llm_peer_hints":
        if not hint.strip():
            out.add(prompt)
            return out.done(has_context=False)
        out.add(prompt + SOLUTION_HEADER)
        out.add(hint, cuttable=True)
        out.add(CLOSING)
        return out.done(has_context=True, used_hint=True)
    elif name == "own_solution_feedback":
        if rollout.passed:
            out.add(prompt + SOLUTION_HEADER)
            out.add(strip_thinking(rollout.text), cuttable=True)
            out.add(CLOSING)
            return out.done(has_context=True, used_own_solution=True)
        if not feedback:
            out.add(prompt)
            return out.done(has_context=False)
        out.add(prompt + OWN_FEEDBACK_HEADER)
        out.add(feedback, cuttable=True)
        out.add(CLOSING)
        return out.done(has_context=True, used_feedback=True)
    elif name == "peer_solution_feedback":
        peer = _peer_solution(group, i)
        use_feedback = bool(feedback) and not (context.feedback_only_without_solution and peer is not None)
        if peer is None and not use_feedback:
            out.add(prompt)
            return out.done(has_context=False)
        out.add(prompt)
        if peer is not None:
            out.add(SOLUTION_HEADER)
            out.add(peer, cuttable=True)
        if use_feedback:
            out.add(FEEDBACK_HEADER)
            out.add(feedback, cuttable=True)
        out.add(CLOSING)
        return out.done(has_context=True, used_peer=peer is not None, used_feedback=use_feedback)
    else:
        raise ContextError(f"context.name: unknown construction {name!r}")


def _build_from_template(group: Sequence[GradedRollout], i: int, *, prompt: str, template: str, hint: str,
                         feedback_only_without_solution: bool) -> TeacherContext:
    """Fill a user template. Fields without a value are empty strings; the context counts as present when
    the template uses no privileged field (fixed wording) or at least one of them is non-empty."""
    rollout = group[i]
    fields = template_fields(template)
    values = {
        "prompt": prompt,
        "own_solution": strip_thinking(rollout.text) if rollout.passed else "",
        "peer_solution": _peer_solution(group, i) or "",
        "hint": hint,
        "feedback": rollout.feedback if rollout.feedback.strip() else "",
    }
    has_solution = any(values[f] for f in ("own_solution", "peer_solution") if f in fields)
    if feedback_only_without_solution and has_solution:
        values["feedback"] = ""
    out = _Text()
    for literal, field, _, _ in string.Formatter().parse(template):
        out.add(literal)
        if field is not None:
            out.add(values[field], cuttable=field != "prompt")
    privileged = [f for f in fields if f != "prompt"]
    return out.done(
        has_context=not privileged or any(values[f] for f in privileged),
        used_peer="peer_solution" in fields and bool(values["peer_solution"]),
        used_feedback="feedback" in fields and bool(values["feedback"]),
        used_own_solution="own_solution" in fields and bool(values["own_solution"]),
        used_hint="hint" in fields and bool(values["hint"]),
    )


def context_metrics(contexts: Sequence[TeacherContext]) -> dict[str, float]:
    """Fractions of rollouts whose teacher context had something, a peer solution, feedback, ..."""
    n = max(len(contexts), 1)
    return {
        "context/has_context_fraction": sum(c.has_context for c in contexts) / n,
        "context/peer_fraction": sum(c.used_peer for c in contexts) / n,
        "context/feedback_fraction": sum(c.used_feedback for c in contexts) / n,
        "context/own_solution_fraction": sum(c.used_own_solution for c in contexts) / n,
        "context/hint_fraction": sum(c.used_hint for c in contexts) / n,
    }


def teacher_prompts_for_group(
    tokenizer: Any,
    group: Sequence[GradedRollout],
    *,
    problem: Problem,
    context: ContextConfig,
    hint: str | None = None,
    thinking: bool = False,
) -> tuple[list[list[int]], list[bool], dict[str, float]]:
    """The teacher phase for one prompt group (METHOD.md section 1, step 3): each rollout's context built
    by `context`, chat-templated and truncated to `context.max_teacher_prompt_tokens`.

    Returns (teacher prompt ids per rollout, has_context per rollout: False means loss 0, metrics).
    """
    contexts = build_teacher_texts(group, problem=problem, context=context, hint=hint,
                                   prompt=student_prompt_text(problem))
    all_ids, tokens, cut = [], 0, 0
    for teacher in contexts:
        ids, m = teacher_prompt_ids(tokenizer, teacher, max_tokens=context.max_teacher_prompt_tokens,
                                    truncation=context.truncation, thinking=thinking)
        all_ids.append(ids)
        tokens += m["teacher_prompt_tokens"]
        cut += m["teacher_prompt_cut_tokens"] > 0
    n = max(len(contexts), 1)
    metrics = {**context_metrics(contexts), "context/teacher_prompt_tokens_mean": tokens / n,
               "context/truncated_fraction": cut / n}
    return all_ids, [c.has_context for c in contexts], metrics
