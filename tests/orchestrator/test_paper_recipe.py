"""The paper sweep files are the paper's recipe, setting by setting: Table 2 of the predictive-law paper
(arXiv 2605.30070) and the SDPO reference it builds on (lasgroup/SDPO at 0e6d510, experiments/rich_feedback/
run_sdpo.sh over verl/trainer/config/sdpo.yaml and user.yaml). The expected values are written out here from
those sources, not read from the files under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.sweep_file import load_sweep
from trainer.config import TrialConfig

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"

# (setting, value, source). Table 2's "mini-batch size 1" is verl's ppo_mini_batch_size=1 in prompts, which verl
# multiplies by rollout.n (verl/workers/fsdp_workers.py line 242): 8 rollouts per optimizer step.
TABLE_2 = [
    ("steps", 50, "METHOD.md section 5: 50 steps per run"),
    ("rollout.prompts_per_step", 32, "Table 2 batch size; sdpo.yaml data.train_batch_size 32"),
    ("rollout.n_samples", 8, "Table 2 rollouts per prompt; run_sdpo.sh rollout.n=8"),
    ("rollout.temperature", 1.0, "Table 2 sampling temperature; verl rollout.yaml temperature 1.0"),
    ("rollout.top_p", 1.0, "verl rollout.yaml top_p 1"),
    ("rollout.max_prompt_tokens", 2048, "Table 2 max prompt length; user.yaml max_prompt_length, filter_overlong_prompts"),
    ("rollout.max_response_tokens", 32768, "Table 2 max response length"),
    ("eval.max_response_tokens", None, "Table 2: 32,768 in validation too (None: the rollout's)"),
    ("model.thinking", False, "user.yaml apply_chat_template_kwargs enable_thinking false"),
    ("context.max_teacher_prompt_tokens", 10240, "sdpo.yaml self_distillation.max_reprompt_len"),
    ("loss.divergence", "reverse_kl", "run_sdpo.sh self_distillation.alpha=1.0"),
    ("loss.support", "topk_tail", "actor.yaml distillation_add_tail true"),
    ("loss.top_k", 20, "Table 2 top-k; run_sdpo.sh distillation_topk=20"),
    ("loss.aggregation", "token_mean", "actor.yaml loss_agg_mode token-mean"),
    ("loss.sdpo_compat", True, "the reference's tail floor and per-micro-batch token mean"),
    ("loss.rollout_ratio_clip", 2.0, "run_sdpo.sh rollout_correction.rollout_is=token; sdpo.yaml threshold 2.0"),
    ("loss.importance_ratio_clip", 2.0, "sdpo.yaml self_distillation.is_clip 2.0"),
    ("optim.lr", 1e-6, "Table 2 learning rate; run_sdpo.sh actor.optim.lr=1e-6"),
    ("optim.weight_decay", 0.01, "optim/fsdp.yaml weight_decay"),
    ("optim.betas", (0.9, 0.999), "optim/fsdp.yaml betas"),
    ("optim.grad_clip", 1.0, "optim/fsdp.yaml clip_grad"),
    ("optim.mini_batch_size", 8, "Table 2 mini-batch size 1 prompt x 8 rollouts"),
    ("optim.micro_batch_size", 1, "user.yaml ppo_micro_batch_size_per_gpu 1"),
    ("teacher.ema_rate", 0.01, "Table 2 EMA rate; run_sdpo.sh ema_update_rate=0.01"),
    ("eval.every_steps", 5, "user.yaml trainer.test_freq 5"),
    ("eval.n_samples", 4, "Table 2 mean@4; run_sdpo.sh val_kwargs.n=4"),
    ("eval.temperature", 0.6, "user.yaml val_kwargs temperature 0.6"),
    ("eval.top_p", 0.95, "user.yaml val_kwargs top_p 0.95"),
    ("data.source", "livecodebench", "METHOD.md section 4"),
    ("data.release", "v6", "METHOD.md section 4: contest_date in [2025-02-01, 2025-05-01)"),
    ("data.split", "tests", "METHOD.md section 4: the reference splits each problem's tests"),
    ("deepspeed.world_size", 8, "b200-8: with micro-batches of 1, one rollout per rank and mini-batch"),
]
# The paper's seeds per model (METHOD.md section 5): three of Qwen3, two of Olmo-3-7B-Instruct.
SEEDS = {"paper_fig1.yaml": {"qwen3-8b": [0, 1, 2], "olmo-3-7b-instruct": [0, 1]},
         "paper_fig3.yaml": {"qwen3-0.6b": [0, 1, 2], "qwen3-1.7b": [0, 1, 2], "qwen3-4b": [0, 1, 2],
                             "qwen3-8b": [0, 1, 2]}}


def setting(config: TrialConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_trial_of_the_paper_sweeps_runs_table_2(name):
    sweep, points = load_sweep(SWEEPS / name)
    wrong = [f"{p.trial_id}: {key} is {setting(p.config, key)!r}, not {value!r} ({source})"
             for p in points for key, value, source in TABLE_2 if setting(p.config, key) != value]
    assert not wrong, "\n".join(wrong)
    seeds = {}
    for p in points:
        seeds.setdefault(p.model, set()).add(p.seed)
    assert {m: sorted(s) for m, s in seeds.items()} == SEEDS[name]
    # 8 rollouts per optimizer step: the 256 rollouts of a step make 32 AdamW updates.
    cfg = points[0].config
    assert cfg.rollout.prompts_per_step * cfg.rollout.n_samples // cfg.optim.mini_batch_size == 32


def test_the_defaults_are_table_2_where_it_has_a_value():
    cfg = TrialConfig()
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n_samples, cfg.rollout.temperature, cfg.rollout.top_p) == \
        (32, 8, 1.0, 1.0)
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_response_tokens) == (2048, 32768)
    assert (cfg.optim.lr, cfg.optim.mini_batch_size, cfg.teacher.ema_rate, cfg.loss.top_k) == (1e-6, 8, 0.01, 20)
    assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.every_steps) == (4, 0.6, 0.95, 5)


def test_plan_of_both_paper_sweeps_shows_the_recipe_and_counts_shared_trials_once():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", "plan", str(SWEEPS / "paper_fig1.yaml"),
                             str(SWEEPS / "paper_fig3.yaml")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    recipe = ("recipe: 50 steps of 32 prompts x 8 rollouts = 256 rollouts, 32 optimizer steps of 8 rollouts each "
              "(micro-batches of 1 on 8 ranks); prompts <= 2,048 tokens (longer problems dropped), responses <= "
              "32,768 (validation 32,768), teacher prompts <= 10,240; lr 1e-06, EMA 0.01, reverse_kl over top-20 "
              "(topk_tail), sdpo_compat on, rollout correction truncated at 2; validation mean@4 at T=0.6, top-p "
              "0.95, every 5 steps")
    assert out.count(recipe) == 2  # one line per sweep file
    # Fig. 3's three Qwen3-8B x peer_solution_feedback trials are Fig. 1's: trained once, by paper-fig1.
    assert out.count("shared: trained by paper-fig1, not counted") == 3
    assert "12 trials (3 shared with paper-fig1: trained there, not here)" in out
    fig1_hours = float(out.split("30 trials, about ")[1].split(" GPU-hours")[0])
    fig3_hours = float(out.split("not here), about ")[1].split(" GPU-hours")[0])
    together = out.split("together: ")[1]
    assert together.startswith("42 trials in 2 sweeps, 39 trained and 3 shared (each counted once), about "
                               f"{fig1_hours + fig3_hours:.1f} GPU-hours")
