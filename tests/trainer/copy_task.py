"""A task on which the self-teacher is clearly better than the student, for learning checks.

Problems ask to print a number; each has a reference solution. A tiny random model is pre-fitted for a few
seconds to copy the solution it finds in its prompt (the `llm_peer_hints` teacher prompt), so the
self-teacher, which sees the solution, writes it, while the student, which does not, cannot.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from sandbox.problems import Problem, ProblemTest
from trainer.batch import pack, response_logits
from trainer.config import ContextConfig
from trainer.contexts import GradedRollout, teacher_prompts_for_group
from trainer.hints import hints_from_reference_solutions
from trainer.models import load_causal_lm, load_tokenizer


def copy_problems(n: int = 8, *, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        value = rng.randint(10, 99)
        problems.append(Problem(
            id=f"copy/{i}", prompt=f"Print the number {value}.", source="jsonl", solution=f"print({value})",
            tests=[ProblemTest(kind="stdin", input="", output=str(value)),
                   ProblemTest(kind="stdin", input="\n", output=str(value))]))
    return problems


def write_problems(path: Path, problems: list[Problem]) -> Path:
    path.write_text("".join(p.model_dump_json() + "\n" for p in problems))
    return path


def copy_task(root: Path, base_model: Path, n: int = 8) -> tuple[Path, Path]:
    """The copy task in `root`: `n` problems written to problems.jsonl and `base_model` fitted to copy their
    hints into copier/; returns (the problems file, the model folder)."""
    problems = copy_problems(n)
    return write_problems(root / "problems.jsonl", problems), prefit_copier(base_model, root / "copier", problems)


def prefit_copier(base_model: Path, out_dir: Path, problems: list[Problem], *, steps: int = 60,
                  lr: float = 3e-3, seed: int = 0) -> Path:
    """Copy `base_model` to `out_dir` and fit it to answer the hint-bearing teacher prompt with the hint."""
    shutil.copytree(base_model, out_dir)
    tokenizer = load_tokenizer(out_dir)
    model = load_causal_lm(out_dir, dtype="float32")
    context = ContextConfig(name="llm_peer_hints")
    hints = hints_from_reference_solutions(problems)
    rows = []
    for problem in problems:
        (prompt_ids,), _, _ = teacher_prompts_for_group(
            tokenizer, [GradedRollout(text="", passed=False)], problem=problem, context=context,
            hint=hints[problem.id])
        answer = tokenizer(hints[problem.id], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, answer))
    # One padded batch; the LM head runs on the answer positions only (it dominates a tiny model's cost).
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = pack([p for p, _ in rows], [a for _, a in rows], pad_id=pad)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.lm_head(response_logits(hidden, batch))
        loss = torch.nn.functional.cross_entropy(logits[batch.response_mask], batch.response_ids[batch.response_mask])
        loss.backward()
        optimizer.step()
        total = float(loss.detach())
    model.eval()
    model.save_pretrained(out_dir)
    (out_dir / "prefit.json").write_text(json.dumps({"steps": steps, "final_loss": total}))
    return out_dir
