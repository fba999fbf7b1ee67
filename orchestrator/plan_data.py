"""What `opsd sweep plan` says about a trial's data and recipe before anything runs.

- `problem_counts`: the problems a trial will train and validate on, counted as the trial counts them
  (trainer/data.py `load_problems`, the prompt-length filter of trainer/prompts.py, `make_split`) when the data
  is on this machine (a local file, HumanEval's package, LiveCodeBench in the Hugging Face cache) and, for the
  over-long prompts, the model's tokenizer too; nothing is downloaded. Otherwise the plan says what it assumes:
  `ASSUMED_VAL_PROBLEMS` validation problems (or `data.max_val_problems`).
- `recipe_line`: the settings that decide how much a trial computes and learns, in one line: rollouts per step,
  optimizer steps per training step, the length limits, and the loss conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from trainer.config import ModelConfig, TrialConfig

# The validation problems the estimates assume when the data is not on this machine (LiveCodeBench v6 has
# 131-175 in the papers' window, METHOD.md section 4).
ASSUMED_VAL_PROBLEMS = 100


@dataclass(frozen=True)
class ProblemCounts:
    """A trial's problems: None where the data (or, for `dropped`, the tokenizer) is not on this machine."""

    loaded: int | None  # in the data window
    dropped: int | None  # student prompt longer than rollout.max_prompt_tokens
    train: int | None
    val: int | None
    source: str  # where the problems were read, or why they could not be
    tokenizer_note: str = ""  # why `dropped` is unknown

    def val_for_estimate(self, cfg: TrialConfig) -> int:
        """Validation problems per evaluation: counted, else data.max_val_problems, else the assumption."""
        if self.val is not None:
            return self.val
        return cfg.data.max_val_problems or ASSUMED_VAL_PROBLEMS


_COUNTS: dict[str, ProblemCounts] = {}


def problem_counts(cfg: TrialConfig) -> ProblemCounts:
    """The trial's problem counts (module docstring); computed once per data, model and prompt limit."""
    key = json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model_dump(mode="json"),
                      cfg.rollout.max_prompt_tokens], sort_keys=True)
    if key not in _COUNTS:
        _COUNTS[key] = _count(cfg)
    return _COUNTS[key]


def _count(cfg: TrialConfig) -> ProblemCounts:
    from trainer.data import local_problems, make_split
    from trainer.prompts import drop_long_prompts

    problems, source = local_problems(cfg.data)
    if problems is None:
        return ProblemCounts(None, None, None, None, source)
    tokenizer, why = local_tokenizer(cfg.model)
    dropped = None
    kept = problems
    if tokenizer is not None:
        kept, skipped = drop_long_prompts(problems, tokenizer, max_tokens=cfg.rollout.max_prompt_tokens,
                                          thinking=cfg.model.thinking)
        dropped = skipped["data/prompts_skipped_too_long"]
    split = make_split(kept, cfg.data) if kept else None
    return ProblemCounts(len(problems), dropped, len(split.train) if split else 0, len(split.val) if split else 0,
                         source, why)


def local_tokenizer(model: ModelConfig):
    """(the model's tokenizer, "") when it is on this machine (a folder, the embedded model, the Hugging Face
    cache), else (None, why); nothing is downloaded."""
    from pathlib import Path

    from trainer.config import EMBEDDED_SMOLLM2
    from trainer.models import load_tokenizer, resolve_model

    missing = None, f"the tokenizer of {model.path} is not on this machine"
    try:
        if model.path == EMBEDDED_SMOLLM2 or model.gguf_file or Path(model.path).expanduser().is_dir():
            return load_tokenizer(resolve_model(model)), ""
        from huggingface_hub import try_to_load_from_cache

        # Asked of the cache first: transformers takes seconds to import, and the answer is usually no.
        if not isinstance(try_to_load_from_cache(model.path, "tokenizer_config.json"), str):
            return missing
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model.path, local_files_only=True), ""
    except Exception:  # noqa: BLE001 - not on this machine (or unreadable): the plan says so instead of counting
        return missing


def data_line(labels: list[str], cfg: TrialConfig, counts: ProblemCounts) -> str:
    """One line for the models `labels` that share these counts: the problems as counted, or the assumption the
    estimates make."""
    data = cfg.data
    what = data.source + (f" {data.release}" if data.release else "")
    who = ", ".join(labels)
    if counts.loaded is None:
        assumed = (f"data.max_val_problems={data.max_val_problems}" if data.max_val_problems
                   else f"{ASSUMED_VAL_PROBLEMS}")
        return (f"data of {who}: {what} not counted ({counts.source}); the estimates assume {assumed} "
                f"validation problems")
    limit = f"student prompt longer than {cfg.rollout.max_prompt_tokens:,} tokens"
    dropped = (f"{counts.dropped} dropped ({limit})" if counts.dropped is not None
               else f"over-long prompts not counted ({counts.tokenizer_note})")
    return (f"data of {who}: {counts.loaded} {what} problems from {counts.source}, {dropped}: "
            f"{counts.train} train and {counts.val} validation problems (data.split '{data.split}')")


def data_lines(points: list) -> list[str]:
    """`data_line` for a sweep's grid points (GridPoint), models with the same counts and data on one line."""
    groups: dict[str, tuple[list[str], TrialConfig, ProblemCounts]] = {}
    for point in points:
        counts = problem_counts(point.config)
        key = json.dumps([point.config.data.model_dump(mode="json"), point.config.rollout.max_prompt_tokens,
                          counts.__dict__], sort_keys=True)
        labels = groups.setdefault(key, ([], point.config, counts))[0]
        if point.model not in labels:
            labels.append(point.model)
    return [data_line(labels, cfg, counts) for labels, cfg, counts in groups.values()]


def recipe_line(cfg: TrialConfig) -> str:
    """One line: rollouts and optimizer steps per training step, length limits, learning rate, EMA and loss."""
    from trainer.minibatches import split_minibatches

    rollouts = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    world = cfg.deepspeed.world_size
    updates = len(split_minibatches(rollouts, cfg.optim.mini_batch_size, cfg.optim.micro_batch_size, rng=None,
                                   world_size=world))
    loss = cfg.loss
    conventions = "sdpo_compat on" if loss.sdpo_compat else "sdpo_compat off"
    if loss.rollout_ratio_clip is not None:
        conventions += f", rollout correction truncated at {loss.rollout_ratio_clip:g}"
    eval_tokens = cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens
    return (f"recipe: {cfg.steps} step{'s' * (cfg.steps != 1)} of {cfg.rollout.prompts_per_step} prompts x "
            f"{cfg.rollout.n_samples} rollouts = {rollouts} rollouts, {updates} optimizer "
            f"step{'s' * (updates != 1)} of {cfg.optim.mini_batch_size} rollouts "
            f"each (micro-batches of {cfg.optim.micro_batch_size} on {world} rank{'s' * (world > 1)}); prompts "
            f"<= {cfg.rollout.max_prompt_tokens:,} tokens (longer problems dropped), responses <= "
            f"{cfg.rollout.max_response_tokens:,} (validation {eval_tokens:,}), teacher prompts <= "
            f"{cfg.context.max_teacher_prompt_tokens:,}; lr {cfg.optim.lr:g}, EMA {cfg.teacher.ema_rate:g}, "
            f"{loss.divergence} over top-{loss.top_k} ({loss.support}), {conventions}; validation mean@"
            f"{cfg.eval.n_samples} at T={cfg.eval.temperature:g}, top-p {cfg.eval.top_p:g}, every "
            f"{cfg.eval.every_steps} steps")
