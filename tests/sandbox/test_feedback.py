"""Feedback text: hand-written expected strings for each case of METHOD.md section 3."""

from __future__ import annotations

from sandbox.feedback import FORMAT_ERROR_TEXT, TRUNCATED_TEXT, TestResult, render_feedback


def r(index, status, input="", output=None, expected=None, error=None, stderr="", kind="stdin"):
    return TestResult(index=index, kind=kind, status=status, input=input, output=output, expected=expected,
                      error=error, stderr=stderr)


def test_all_passed_is_empty():
    assert render_feedback([r(0, "passed", "1", "1", "1"), r(1, "passed", "2", "2", "2")]) == ""


def test_format_error_and_truncation():
    assert render_feedback([], format_error=True) == "Incorrect Format: Put your code inside a ```python ... ``` block."
    assert render_feedback([], format_error=True) == FORMAT_ERROR_TEXT
    assert render_feedback([], format_error=True, truncated=True) == (
        "Truncated Attempt: Your previous response was too long and truncated because it reached the maximum "
        "response length. Try again with a shorter response.")
    assert render_feedback([], format_error=True, truncated=True) == TRUNCATED_TEXT


def test_wrong_answers_two_shortest_first_with_debug_output():
    results = [
        r(0, "passed", "1 1", "2", "2"),
        r(1, "wrong_answer", "10 20 30", "61", "60"),
        r(2, "wrong_answer", "1 2", "4", "3", stderr="dbg a\ndbg b\n"),
        r(3, "wrong_answer", "5 5", "11", "10"),
    ]
    expected = (
        "Test Case 3: Wrong Answer\n"
        "\n"
        "Input\n"
        "1 2\n"
        "\n"
        "Output\n"
        "4\n"
        "\n"
        "Expected\n"
        "3\n"
        "\n"
        "Debug Output\n"
        "dbg a\n"
        "dbg b\n"
        "\n"
        "Test Case 4: Wrong Answer\n"
        "\n"
        "Input\n"
        "5 5\n"
        "\n"
        "Output\n"
        "11\n"
        "\n"
        "Expected\n"
        "10"
    )
    assert render_feedback(results) == expected


def test_runtime_error_wins_over_wrong_answer_and_time_limit():
    results = [
        r(0, "wrong_answer", "1", "2", "3"),
        r(1, "time_limit", "big"),
        r(2, "runtime_error", "0\n", error='Traceback (most recent call last):\n  File "solution.py", line 2, in <module>\n'
          "ZeroDivisionError: division by zero"),
    ]
    assert render_feedback(results) == (
        "Runtime Error\n"
        "Traceback (most recent call last):\n"
        '  File "solution.py", line 2, in <module>\n'
        "ZeroDivisionError: division by zero\n"
        "\n"
        "Last Executed Input\n"
        "0"
    )


def test_time_limit_then_memory_and_output_limits():
    assert render_feedback([r(0, "wrong_answer", "1", "2", "3"), r(1, "time_limit", "100000")]) == (
        "Time Limit Exceeded\n\nLast Executed Input\n100000")
    assert render_feedback([r(0, "memory_limit", "7")]) == "Memory Limit Exceeded\n\nLast Executed Input\n7"
    assert render_feedback([r(0, "output_limit", "7")]) == "Output Limit Exceeded\n\nLast Executed Input\n7"
    # A time limit is reported before a memory limit that came earlier in test order.
    assert render_feedback([r(0, "memory_limit", "a"), r(1, "time_limit", "b")]).startswith("Time Limit Exceeded")


def test_input_is_cut_to_8_lines_and_values_to_250_chars():
    long_input = "\n".join(str(i) for i in range(12))
    long_output = "x" * 300
    text = render_feedback([r(0, "wrong_answer", long_input, long_output, "y" * 251)])
    assert text == (
        "Test Case 1: Wrong Answer\n\nInput\n0\n1\n2\n3\n4\n5\n6\n7\n... (4 more lines)\n\n"
        "Output\n" + "x" * 250 + "...\n\nExpected\n" + "y" * 250 + "...")
    wide = r(0, "time_limit", "z" * 260)
    assert render_feedback([wide]) == "Time Limit Exceeded\n\nLast Executed Input\n" + "z" * 250 + "..."


def test_debug_output_is_cut_to_10_lines():
    stderr = "\n".join(f"line {i}" for i in range(15))
    text = render_feedback([r(0, "wrong_answer", "1", "2", "3", stderr=stderr)])
    assert text.endswith("Debug Output\n" + "\n".join(f"line {i}" for i in range(10)) + "\n... (5 more lines)")


def test_wrong_answer_reason_and_missing_output():
    text = render_feedback([r(0, "wrong_answer", "1", None, "2", error="(the output is not valid UTF-8)")])
    assert text == ("Test Case 1: Wrong Answer\n\nInput\n1\n\nOutput\n(no output)\n(the output is not valid UTF-8)"
                    "\n\nExpected\n2")


def test_capped_at_2000_chars_and_deterministic():
    results = [r(i, "wrong_answer", "\n".join("a" * 250 for _ in range(8)), "b" * 250, "c" * 250,
                 stderr="\n".join("d" * 300 for _ in range(10))) for i in range(3)]
    text = render_feedback(results)
    assert len(text) == 2000
    assert text == render_feedback(list(results))
    assert text.startswith("Test Case 1: Wrong Answer")
