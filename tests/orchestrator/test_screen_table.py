"""The table `opsd screen` prints: one wide table where the terminal holds it, and at 80 columns one narrow
table per measure (and one of predictions), every cell whole, instead of every column cut to a character."""

from __future__ import annotations

import sys

from rich.console import Console

from orchestrator.screen_cli import screen_tables

CONTEXTS = ["none", "expert_preamble", "feedback", "llm_peer_hints", "own_solution_feedback", "peer_solution_feedback"]


def rows() -> list[dict]:
    out = []
    for k, context in enumerate(CONTEXTS):
        gap = 0.01 * k
        out.append(dict(
            model="smollm2", context=context, n_samples=1, val_problems=10, temperature=1.0, confidence=0.95,
            bootstrap_resamples=2000, bootstrap_seed=0, initial_student_acc_t1=0.1, initial_teacher_acc=0.1 + gap,
            initial_gap=gap, initial_gap_lo=gap - 0.05, initial_gap_hi=gap + 0.05, initial_student_test_frac_t1=0.3,
            initial_teacher_test_frac=0.3 + 2 * gap, initial_gap_test_frac=2 * gap, initial_gap_test_frac_lo=-0.125,
            initial_gap_test_frac_hi=0.25, predicted_improvement=gap / 2, pi_lo=-0.2, pi_hi=0.4, extrapolated=k == 5))
    return out


def render(width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    for renderable in screen_tables(rows(), predictions=True, width=width):
        console.print(renderable)
    return console.export_text()


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in text.splitlines()
            if line.startswith("│")]


def test_at_80_columns_one_narrow_table_per_measure_every_cell_whole():
    text = render(80)
    assert max(len(line) for line in text.splitlines()) <= 80
    cells = table_rows(text)
    assert len(cells) == 3 * len(CONTEXTS)  # all tests passed, fraction of tests, predictions
    acc, tests, predicted = cells[:6], cells[6:12], cells[12:]
    assert [r[0] for r in acc] == [r[0] for r in tests] == [r[0] for r in predicted] == CONTEXTS
    assert acc[3] == ["llm_peer_hints", "0.100", "0.130", "+0.030 [-0.020, +0.080]"]
    assert tests[5] == ["peer_solution_feedback", "0.300", "0.400", "+0.100 [-0.125, +0.250]"]
    assert predicted[5] == ["peer_solution_feedback", "+0.025* [-0.200, +0.400]"]
    words = " ".join(text.split())  # the caption wraps at the terminal's width
    assert "all tests passed" in words and "fraction of tests passed" in words and "paired bootstrap" in words


def test_a_wide_terminal_gets_one_table_with_every_column():
    text = render(200)
    cells = table_rows(text)
    assert len(cells) == len(CONTEXTS)
    assert cells[5] == ["peer_solution_feedback", "0.100", "0.150", "+0.050 [+0.000, +0.100]", "0.300", "0.400",
                        "+0.100 [-0.125, +0.250]", "+0.025* [-0.200, +0.400]"]


def test_what_third_parties_print_during_a_phase_stays_off_the_terminal(capsys):
    """On a terminal, a library imported during a phase (vLLM) binds its log handler to sys.stdout as it is
    then: that must be the process's own stdout (the screen's log), not the progress display's proxy, or its
    warnings reach the terminal until the process ends (the engine's shutdown warnings after the table)."""
    import io
    import logging

    from orchestrator.screen_cli import _phases

    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=80)
    logger = logging.getLogger("a-library-imported-during-a-phase")
    logger.propagate = False
    try:
        with _phases(console, "") as phase:
            with phase("engine start"):
                logger.addHandler(logging.StreamHandler(sys.stdout))  # as vLLM's logging config does
                print("printed during the phase")
        logger.warning("[shutdown] force killing remaining processes count=1")
    finally:
        logger.handlers.clear()
    shown = terminal.getvalue()
    assert "engine start" in shown
    assert "printed during the phase" not in shown and "force killing" not in shown
    assert "force killing" in capsys.readouterr().out  # the process's stdout, which the screen sends to its log
