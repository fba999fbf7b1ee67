"""Context constructions: exact teacher texts on a hand-made group, the peer rule, flags, user templates."""

import pytest
from pydantic import ValidationError

from sandbox.problems import Problem, ProblemTest
from trainer.config import ContextConfig, TrialConfig, format_validation_error
from trainer.contexts import (
    CONTEXT_NAMES,
    EXPERT_PREAMBLE,
    ContextError,
    GradedRollout,
    build_teacher_texts,
    context_metrics,
    strip_thinking,
)
from trainer.prompts import student_prompt_text

PROBLEM = Problem(id="p1", prompt="Add two numbers read from stdin.", tests=[ProblemTest(kind="stdin", input="1 2", output="3")])
P = "PROMPT"  # the student's user message, passed explicitly so the expected strings stay short

# A group of four: a failure with feedback, a success with a thinking block, a failure without
# feedback, and a second success.
GROUP = [
    GradedRollout(text="wrong code", passed=False, feedback="Test Case 1: Wrong Answer"),
    GradedRollout(text="<think>let me think</think>\nfirst good", passed=True, feedback=""),
    GradedRollout(text="no code", passed=False, feedback=""),
    GradedRollout(text="second good", passed=True, feedback=""),
]


def build(name, group=GROUP, hint=None, **kw):
    return build_teacher_texts(group, problem=PROBLEM, context=ContextConfig(name=name, **kw), hint=hint, prompt=P)


def test_none_is_the_prompt_and_counts_as_context():
    out = build("none")
    assert [c.text for c in out] == [P] * 4
    assert all(c.has_context and not c.used_peer and not c.used_feedback for c in out)


def test_expert_preamble_text():
    out = build("expert_preamble")
    expected = EXPERT_PREAMBLE + "\n\n---\n\nPROMPT\n\nThink step by step first, then write the solution."
    assert [c.text for c in out] == [expected] * 4
    assert all(c.has_context for c in out)
    # The paper's outline (Table 3): checklist, complexity table, pattern rules, edge cases, a 9-step method.
    sections = ["Data structures and algorithms to consider:", "| n up to | acceptable complexity |",
                "Pattern rules:", "Edge cases to check:", "Method, step by step:"]
    positions = [EXPERT_PREAMBLE.index(s) for s in sections]
    assert positions == sorted(positions)
    method = EXPERT_PREAMBLE[positions[-1]:].splitlines()[1:]
    assert [line.split(".")[0] for line in method] == [str(i) for i in range(1, 10)]
    import trainer.expert_preamble

    assert "reconstructed from the predictive-law paper's description" in trainer.expert_preamble.__doc__


def test_feedback_text_and_flags():
    out = build("feedback")
    assert out[0].text == ("PROMPT\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                           "Test Case 1: Wrong Answer\n\nCorrectly solve the original question.")
    assert out[0].has_context and out[0].used_feedback and not out[0].used_peer
    # accepted rollouts with empty feedback and a failure without feedback add nothing
    for c in out[1:]:
        assert c.text == P and not c.has_context and not c.used_feedback


def test_llm_peer_hints_text():
    out = build("llm_peer_hints", hint="```python\nprint(3)\n```")
    expected = "PROMPT\nCorrect solution:\n\n```python\nprint(3)\n```\n\nCorrectly solve the original question."
    assert [c.text for c in out] == [expected] * 4
    assert all(c.has_context and c.used_hint for c in out)
    empty = build("llm_peer_hints", hint="")
    assert all(c.text == P and not c.has_context for c in empty)
    with pytest.raises(ContextError, match="needs a hint for problem 'p1'"):
        build("llm_peer_hints", hint=None)


def test_own_solution_feedback_text():
    out = build("own_solution_feedback")
    assert out[0].text == "PROMPT\nFeedback:\n\nTest Case 1: Wrong Answer\n\nCorrectly solve the original question."
    assert out[0].used_feedback and not out[0].used_own_solution
    # its own correct answer, thinking removed
    assert out[1].text == "PROMPT\nCorrect solution:\n\nfirst good\n\nCorrectly solve the original question."
    assert out[1].used_own_solution and not out[1].used_peer
    assert out[2].text == P and not out[2].has_context
    assert out[3].text == "PROMPT\nCorrect solution:\n\nsecond good\n\nCorrectly solve the original question."


def test_peer_solution_feedback_texts_and_peer_rule():
    out = build("peer_solution_feedback")
    # rollout 0: first successful other rollout is 1 (thinking removed), plus its own feedback
    assert out[0].text == ("PROMPT\nCorrect solution:\n\nfirst good"
                           "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                           "Test Case 1: Wrong Answer\n\nCorrectly solve the original question.")
    assert out[0].used_peer and out[0].used_feedback
    # rollout 1 succeeded itself: its peer is the next success (3), never itself
    assert out[1].text == "PROMPT\nCorrect solution:\n\nsecond good\n\nCorrectly solve the original question."
    assert out[1].used_peer and not out[1].used_feedback
    # rollout 2 (no feedback) still gets the first success
    assert out[2].text == "PROMPT\nCorrect solution:\n\nfirst good\n\nCorrectly solve the original question."
    # rollout 3: the first successful other rollout is 1
    assert out[3].text == out[2].text
    assert all(c.has_context for c in out)


def test_peer_solution_feedback_lone_success_and_no_success():
    lone = [GradedRollout("bad", False, "Runtime Error"), GradedRollout("good", True, ""), GradedRollout("bad2", False, "")]
    out = build("peer_solution_feedback", group=lone)
    # the only success has no other successful rollout and no feedback: nothing to add
    assert out[1].text == P and not out[1].has_context and not out[1].used_peer
    assert out[2].used_peer and not out[2].used_feedback
    none_ok = [GradedRollout("bad", False, "Time Limit Exceeded"), GradedRollout("bad2", False, "   ")]
    out = build("peer_solution_feedback", group=none_ok)
    assert out[0].text == ("PROMPT\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                           "Time Limit Exceeded\n\nCorrectly solve the original question.")
    assert out[0].has_context and out[0].used_feedback and not out[0].used_peer
    # whitespace-only feedback counts as none
    assert out[1].text == P and not out[1].has_context


def test_feedback_only_without_solution():
    out = build("peer_solution_feedback", feedback_only_without_solution=True)
    assert out[0].text == "PROMPT\nCorrect solution:\n\nfirst good\n\nCorrectly solve the original question."
    assert out[0].used_peer and not out[0].used_feedback
    no_peer = [GradedRollout("bad", False, "fb A"), GradedRollout("bad", False, "fb B")]
    out = build("peer_solution_feedback", group=no_peer, feedback_only_without_solution=True)
    assert out[1].text == ("PROMPT\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                           "fb B\n\nCorrectly solve the original question.")


def test_strip_thinking():
    assert strip_thinking("<think>a\nb</think>\n\nanswer") == "answer"
    assert strip_thinking("x<think>1</think> y <think>2</think>z") == "xy z"
    # the template opened the thought in the prompt: the response starts inside it
    assert strip_thinking("reasoning...</think>\n```python\npass\n```") == "```python\npass\n```"
    assert strip_thinking("no thoughts") == "no thoughts"


def test_cuttable_spans_cover_only_privileged_text():
    out = build("peer_solution_feedback")
    text = out[0].text
    assert [text[a:b] for a, b in out[0].cuttable] == ["first good", "Test Case 1: Wrong Answer"]


def test_default_prompt_is_the_student_message():
    out = build_teacher_texts(GROUP[:1], problem=PROBLEM, context=ContextConfig(name="none"))
    assert out[0].text == student_prompt_text(PROBLEM)


def test_user_template_fills_fields():
    cfg = dict(name="mine", template="{prompt}\n[peer]{peer_solution}[fb]{feedback}[own]{own_solution}[hint]{hint} {{x}}")
    out = build(group=GROUP, hint="H", **cfg)
    assert out[0].text == "PROMPT\n[peer]first good[fb]Test Case 1: Wrong Answer[own][hint]H {x}"
    assert out[1].text == "PROMPT\n[peer]second good[fb][own]first good[hint]H {x}"
    assert out[0].used_peer and out[0].used_feedback and out[0].used_hint and not out[0].used_own_solution
    assert [out[0].text[a:b] for a, b in out[0].cuttable] == ["first good", "Test Case 1: Wrong Answer", "H"]


def test_user_template_context_flags():
    only_fb = dict(name="fb_only", template="Fix it.\n{prompt}\n{feedback}")
    out = build(**only_fb)
    assert [c.has_context for c in out] == [True, False, False, False]
    fixed = dict(name="fixed", template="Be careful.\n{prompt}")
    out = build(**fixed)
    assert all(c.has_context for c in out) and out[0].text == "Be careful.\nPROMPT"
    fows = dict(name="fows", template="{prompt}{peer_solution}|{feedback}", feedback_only_without_solution=True)
    out = build(**fows)
    assert out[0].text == "PROMPTfirst good|" and not out[0].used_feedback


@pytest.mark.parametrize("template, message", [
    ("{prompt} {foo}", "unknown field {foo}; allowed fields: {prompt}, {feedback}, {own_solution}, {peer_solution}, {hint}"),
    ("{feedback}", "must contain {prompt}"),
    ("{prompt} {}", "is not a plain name"),
    ("{prompt} {feedback!r}", "must not have a format spec"),
    ("{prompt} }", "malformed braces"),
])
def test_bad_templates_fail_at_config_validation(template, message):
    with pytest.raises(ValidationError) as err:
        TrialConfig.model_validate({"context": {"name": "mine", "template": template}})
    assert message in format_validation_error(err.value)


def test_context_names_are_validated():
    for name in CONTEXT_NAMES:
        assert ContextConfig(name=name).name == name
    with pytest.raises(ValidationError, match="unknown construction 'peer_solution'"):
        ContextConfig(name="peer_solution")
    with pytest.raises(ValidationError, match="needs its own name"):
        ContextConfig(name="feedback", template="{prompt}")


def test_context_metrics():
    m = context_metrics(build("feedback"))
    assert m["context/has_context_fraction"] == 0.25 and m["context/feedback_fraction"] == 0.25
    assert m["context/peer_fraction"] == 0.0


def test_from_verdict():
    from sandbox.grader import Verdict

    v = Verdict(verdict="wrong_answer", passed=False, tests_passed=1, tests_total=2, feedback="Test Case 2: Wrong Answer")
    assert GradedRollout.from_verdict("code", v) == GradedRollout("code", False, "Test Case 2: Wrong Answer")


def test_groups_pair_each_rollout_with_its_verdict():
    from sandbox.grader import Verdict

    def verdict(passed, feedback):
        return Verdict(verdict="accepted" if passed else "wrong_answer", passed=passed, tests_passed=int(passed),
                       tests_total=1, feedback=feedback)

    texts = [["a0", "a1"], ["b0", "b1"]]
    verdicts = [verdict(False, "fa0"), verdict(True, ""), verdict(False, "fb0"), verdict(False, "fb1")]
    assert GradedRollout.groups(texts, verdicts) == [
        [GradedRollout("a0", False, "fa0"), GradedRollout("a1", True, "")],
        [GradedRollout("b0", False, "fb0"), GradedRollout("b1", False, "fb1")]]
