"""`opsd sweep plan`: the grid, the resources, the compute and the checkpoint storage of a sweep, before it runs.

Compute comes, phase by phase, from a finished trial when one exists under the sweep's storage (or the
`--measured` folders): its steps.parquet train rows hold each phase's seconds (`time/<phase>_s`), the tokens
it ran over (`tokens/<name>`, trainer.records.TOKEN_COLUMNS: real tokens, padding excluded) and the whole
step's wall time (`step_seconds`). From them, per reference trial (`MeasuredRates`):

- rollout, old log-probs, teacher forward, student forward + backward: seconds per token (the rollout per
  generated token, each forward per token of its rows), and each forward's prompt tokens per rollout;
- the rest of a step: sandbox and teacher contexts per rollout, everything else (optimizer, weight push, EMA,
  the time between phases) per step;
- outside the steps (start-up, evaluations, checkpoints): trial.json's wall time minus the steps', per
  evaluation token.

A trial of the sweep then costs, in wall seconds, with R = steps x prompts per step x samples its rollouts,
r its mean response (its maximum times the reference's measured fill), and E its engine ranks (the ranks
that sample and evaluate: every rank with `rollout.engines: every_rank`, else 1), E_ref the reference's:

    rollout           s/token x R x r x E_ref / E
    each forward      s/token x R x (prompt tokens per rollout + r)
    rest of step      s/rollout x R + s/step x steps
    outside steps     s/eval token x evaluation tokens x E_ref / E

The rollout's and the evaluations' seconds divide by the engines that share them (each engine samples its
share at once); the start-up and checkpoints counted among "outside steps" do not, but evaluations dominate
that part at any size worth planning. The sandbox's time (rest of step) stays: its workers are the trial's,
split over the engine ranks, as many in all.

times its devices (GPUs, else CPUs), in hours; the reference must be of the same model (its rates are also
printed per token x billion parameters, the unit of the constants below). Without one, a stated per-token
model gives the whole trial (no phase split):

    device-seconds per trial = tokens x size_b x SECONDS_PER_TOKEN_BILLION[device]
                               + STARTUP_SECONDS[device] x devices

with tokens = steps x rollouts per step x (mean response + the student's and the self-teacher's prompts:
the rollout generates the response, the forwards read the prompts too) plus the evaluations' sampled tokens,
each response and prompt taken as half its maximum; the start-up (engine, models, DeepSpeed, sandbox) is a
trial's fixed cost, which dominates small trials. The GPU constants are set so that the papers' setting
(Qwen3-8B, 50 steps of 32 x 8 rollouts up to 32,768 tokens, evaluations every 5 steps on 100 validation
problems) gives their ~20 B200-hours per run (METHOD.md section 5); the CPU ones were measured with
SmolLM2-135M on the 2-core machine of the README (sweeps/first.yaml and the demo's trials). Either is a rough
guide, and says so. The papers' runs (verl) had an inference engine on every GPU, as `rollout.engines:
every_rank` has, so every device works on every token: that is what a device-second per token assumes. With
fewer engines than ranks (`main`: rank 0 alone) the generated tokens (the rollouts' responses and the
evaluations' samples) keep the N ranks for N / E times as long, the other ranks waiting:

    device-seconds per trial = (tokens + generated tokens x (N / E - 1)) x size_b x SECONDS_PER_TOKEN_BILLION
                               + STARTUP_SECONDS x devices

The evaluations' problems are counted from the data when it is on this machine (orchestrator/plan_data.py),
else assumed; the plan prints which.

On GPUs the plan ends with each model's memory per GPU by phase (orchestrator/gpu_memory.py), and refuses a
sweep a trial of which cannot fit (`check_memory`, which `opsd sweep run` calls too).
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from orchestrator.errors import SweepError
from orchestrator.gpu_memory import (
    PHASE_TITLES,
    PHASES,
    PROCESS_OVERHEAD_BYTES,
    GiB,
    TrialMemory,
    estimate_trial_memory,
    fit_problem,
)
from orchestrator.model_shape import read_model_shape
from orchestrator.plan_data import problem_counts
from orchestrator.sweep_file import GridPoint, SweepFile, model_label
from orchestrator.sweep_state import read_step_rows
from trainer.layout import SUMMARY, TrialFolder
from trainer.rank_shares import budget_line, engine_ranks, rank_budgets

# Device-seconds per (token x billion parameters), calibrated as the module docstring says.
SECONDS_PER_TOKEN_BILLION = {"cuda": 1.9e-5, "cpu": 0.25}
# Wall seconds of a trial's start-up, before its first evaluation.
STARTUP_SECONDS = {"cuda": 300.0, "cpu": 60.0}
# Checkpoint bytes per parameter: module weights, fp32 Adam moments (and fp32 master weights with bf16),
# and the EMA teacher.
BYTES_PER_PARAM = {"float32": 4 + 8 + 4, "bfloat16": 2 + 12 + 2}
FINAL_BYTES_PER_PARAM = {"float32": 4 + 4, "bfloat16": 2 + 2}
_SIZE_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)
EMBEDDED_SIZE_B = 0.135
# The phases of a train row whose time grows with tokens, and the token column each one's seconds divide by.
TOKEN_PHASES = {"rollout": "rollout_generated", "old_logps": "old_logps", "teacher_forward": "teacher_forward",
                "student_forward_backward": "student_forward_backward"}
# Phases whose time grows with the rollouts and not with the model.
ROLLOUT_PHASES = ("sandbox", "teacher_context")
# The parts of a measured estimate, in the plan's columns.
PARTS = (*TOKEN_PHASES, "rest_of_step", "outside_steps")
PART_TITLES = {"rollout": "rollout", "old_logps": "old logps", "teacher_forward": "teacher fwd",
               "student_forward_backward": "student fwd+bwd", "rest_of_step": "rest of step",
               "outside_steps": "eval+start"}


@dataclass
class TrialEstimate:
    point: GridPoint
    size_b: float | None
    tokens: float
    device_hours: float | None
    source: str  # "measured: <trial folder>" or "per-token model"
    phase_hours: dict[str, float] = field(default_factory=dict)  # PARTS -> device-hours (measured only)
    # The sweep that trains this trial when it is another one (orchestrator/shared_trials.py): not run here,
    # not counted in this sweep's total.
    shared_with: str | None = None


@dataclass
class MeasuredRates:
    """A finished trial's wall seconds per unit of work, on its resources (module docstring)."""

    folder: Path
    model: str
    size_b: float | None
    seconds_per_token: dict[str, float]  # token phase -> seconds per token it ran over
    prompt_tokens_per_rollout: dict[str, float]  # token phase -> its tokens per rollout besides the response
    response_fill: float  # mean response tokens / max_response_tokens
    seconds_per_rollout: float  # sandbox and teacher contexts
    seconds_per_step: float  # the rest of a step
    seconds_per_eval_token: float  # start-up, evaluations and checkpoints
    engine_ranks: int = 1  # the ranks that sampled and evaluated (trainer.runtime.TrialRuntime.engine_ranks)


def model_size_b(point: GridPoint) -> float | None:
    """Billions of parameters: the sweep's `size_b`, else read from the model's name (Qwen3-8B -> 8)."""
    if point.config.model.size_b is not None:
        return point.config.model.size_b
    if point.config.model.path.startswith("embedded:"):
        return EMBEDDED_SIZE_B
    match = _SIZE_IN_NAME.search(point.config.model.path.split("/")[-1])
    if not match:
        return None
    value = float(match.group(1))
    return value if match.group(2).lower() == "b" else value / 1000


def trial_rollouts(point: GridPoint) -> int:
    cfg = point.config
    return cfg.steps * cfg.rollout.prompts_per_step * cfg.rollout.n_samples


def eval_tokens(point: GridPoint, val_problems: int | None = None) -> float:
    """Tokens the trial's evaluations sample (before step 1, every `eval.every_steps`, after the last step),
    each response taken as half its maximum, on `val_problems` (default: counted, else assumed; plan_data)."""
    cfg = point.config
    evals = cfg.steps // cfg.eval.every_steps + 1 + (cfg.steps % cfg.eval.every_steps != 0)
    val_problems = val_problems or problem_counts(cfg).val_for_estimate(cfg)
    eval_response = (cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens) / 2
    return evals * val_problems * (cfg.eval.n_samples + 1 + cfg.eval.teacher_n_samples) * eval_response


def generated_tokens(point: GridPoint) -> float:
    """The tokens the trial's engines generate: its rollouts' responses (half their maximum each) and its
    evaluations' samples."""
    cfg = point.config
    return trial_rollouts(point) * cfg.rollout.max_response_tokens / 2 + eval_tokens(point)


def trial_tokens(point: GridPoint) -> float:
    """The per-token model's tokens: per rollout its response and the student's and the self-teacher's
    prompts (half their maxima each), plus evaluation tokens."""
    cfg = point.config
    per_rollout = (cfg.rollout.max_response_tokens + cfg.rollout.max_prompt_tokens
                   + cfg.context.max_teacher_prompt_tokens) / 2
    return trial_rollouts(point) * per_rollout + eval_tokens(point)


def measured_rates(folder: Path) -> MeasuredRates | None:
    """The rates of the completed trial in `folder` (trial.json, config.json, steps.parquet), or None when it
    has no train rows with token counts (a trial written before steps.parquet had them)."""
    from trainer.config import TrialConfig

    files = TrialFolder(folder)
    try:
        summary = json.loads(files.summary_path.read_text())
        ref = TrialConfig.model_validate(json.loads(files.config.read_text()))
        rows = read_step_rows(files.steps)
    except (OSError, ValueError):  # StepsUnreadable among them: a damaged trial measures nothing
        return None
    if summary.get("status", "completed") != "completed":
        return None
    train = [r for r in rows if r.get("phase") == "train" and r.get("tokens/rollout_generated") is not None]
    if not train:
        return None

    def total(key: str, rows: list[dict]) -> float:
        return float(sum(r.get(key) or 0 for r in rows))

    rollouts, generated = total("rollouts", train), total("tokens/rollout_generated", train)
    per_token, prompt_per_rollout = {}, {}
    for phase, column in TOKEN_PHASES.items():
        rows = [r for r in train if r.get(f"time/{phase}_s") is not None and r.get(f"tokens/{column}")]
        if not rows:
            continue
        per_token[phase] = total(f"time/{phase}_s", rows) / total(f"tokens/{column}", rows)
        if phase != "rollout":
            prompt_per_rollout[phase] = (total(f"tokens/{column}", rows) - total("tokens/rollout_generated", rows)) \
                / total("rollouts", rows)
    per_rollout = sum(total(f"time/{p}_s", train) for p in ROLLOUT_PHASES) / rollouts
    phase_seconds = sum(total(f"time/{p}_s", train) for p in (*TOKEN_PHASES, *ROLLOUT_PHASES))
    step_seconds = sum(r.get("step_seconds") or sum(v or 0 for k, v in r.items() if k.startswith("time/"))
                       for r in train)
    ref_point = GridPoint("ref", "ref", ref.context.name, ref.seed, ref)
    # Steps not in the table (a trial cut short) are counted at the median step's time.
    missing = max(ref.steps - len(train), 0) * statistics.median(
        r.get("step_seconds") or sum(v or 0 for k, v in r.items() if k.startswith("time/")) for r in train)
    outside = max(float(summary.get("wall_seconds") or 0) - step_seconds - missing, 0.0)
    return MeasuredRates(
        folder=folder, model=ref.model.path, size_b=model_size_b(ref_point),
        seconds_per_token=per_token, prompt_tokens_per_rollout=prompt_per_rollout,
        response_fill=generated / rollouts / ref.rollout.max_response_tokens, seconds_per_rollout=per_rollout,
        seconds_per_step=(step_seconds - phase_seconds) / len(train),
        seconds_per_eval_token=outside / max(eval_tokens(ref_point, _val_problems(folder)), 1.0),
        engine_ranks=engine_ranks(ref.deepspeed.world_size, ref.rollout.engines))


def _val_problems(folder: Path) -> int | None:
    """The validation problems a finished trial evaluated on (its eval rows' `val_problems`)."""
    rows = [r for r in read_step_rows(folder / "steps.parquet") if r.get("val_problems")]
    return int(rows[0]["val_problems"]) if rows else None


def find_references(search_roots: list[Path]) -> list[MeasuredRates]:
    """Every completed trial with token counts under `search_roots` (folders holding a trial.json)."""
    found = []
    for root in search_roots:
        for summary_path in sorted(root.glob(f"**/{SUMMARY}")):
            rates = measured_rates(summary_path.parent)
            if rates is not None:
                found.append(rates)
    return found


def measured_seconds(point: GridPoint, rates: MeasuredRates) -> dict[str, float]:
    """Wall seconds of each part (PARTS) of the trial at `point`, from `rates` (module docstring)."""
    cfg = point.config
    rollouts = trial_rollouts(point)
    response = cfg.rollout.max_response_tokens * rates.response_fill
    # The reference's engines shared its sampling; this trial's share theirs.
    engines = rates.engine_ranks / engine_ranks(cfg.deepspeed.world_size, cfg.rollout.engines)
    seconds = {}
    for phase, per_token in rates.seconds_per_token.items():
        tokens = rollouts * (rates.prompt_tokens_per_rollout.get(phase, 0.0) + response)
        seconds[phase] = per_token * tokens * (engines if phase == "rollout" else 1.0)
    seconds["rest_of_step"] = rates.seconds_per_rollout * rollouts + rates.seconds_per_step * cfg.steps
    seconds["outside_steps"] = rates.seconds_per_eval_token * eval_tokens(point) * engines
    return seconds


def estimate(sweep: SweepFile, points: list[GridPoint], references: list[MeasuredRates]) -> list[TrialEstimate]:
    """Each trial's device-hours: from a finished trial of its model among `references` (`find_references`),
    else from the per-token model."""
    out = []
    res = sweep.trial_resources
    devices = res.gpus or res.cpus  # GPU-hours on GPUs, core-hours on CPUs
    for point in points:
        size = model_size_b(point)
        tokens = trial_tokens(point)
        ref = next((r for r in references if r.model == point.config.model.path), None)
        if ref is not None:
            hours = {part: s * devices / 3600 for part, s in measured_seconds(point, ref).items()}
            out.append(TrialEstimate(point, size, tokens, sum(hours.values()), f"measured: {ref.folder}", hours))
        elif size is not None:
            # Generated tokens keep every rank busy N / E times as long (module docstring).
            ranks = point.config.deepspeed.world_size
            waiting = ranks / engine_ranks(ranks, point.config.rollout.engines) - 1
            seconds = (tokens + generated_tokens(point) * waiting) * SECONDS_PER_TOKEN_BILLION[point.config.device] \
                * size + STARTUP_SECONDS[point.config.device] * devices
            out.append(TrialEstimate(point, size, tokens, seconds / 3600, "per-token model"))
        else:
            out.append(TrialEstimate(point, None, tokens, None, "unknown size: give models[].size_b"))
    return out


def rates_lines(references: list[MeasuredRates]) -> list[str]:
    """One line per reference trial: its seconds per token of each token phase, also per token x B."""
    lines = []
    for r in references:
        size = f", {r.size_b:g}B" if r.size_b else ""
        rates = ", ".join(
            f"{PART_TITLES[p]} {s:.3g} s/token" + (f" ({s / r.size_b:.3g} per token x B)" if r.size_b else "")
            for p, s in r.seconds_per_token.items())
        engines = f", {r.engine_ranks} engines" if r.engine_ranks > 1 else ""
        lines.append(f"measured on {r.folder} ({r.model}{size}{engines}): {rates}; rest of step "
                     f"{r.seconds_per_rollout:.3g} s/rollout + {r.seconds_per_step:.3g} s/step; outside the steps "
                     f"{r.seconds_per_eval_token:.3g} s per evaluation token")
    return lines


def budget_lines(sweep: SweepFile, points: list[GridPoint]) -> list[str]:
    """Each distinct per-rank CPU budget of the sweep's trials (trainer/rank_shares.py), from its resources."""
    cpus = sweep.trial_resources.cpus
    lines = []
    for point in points:
        cfg = point.config
        budgets = rank_budgets(cpus, world_size=cfg.deepspeed.world_size, engines=cfg.rollout.engines,
                               sandbox_workers=cfg.sandbox.workers or cpus, device=cfg.device)
        lines.append(budget_line(budgets, cpus=cpus, engines=cfg.rollout.engines))
    return list(dict.fromkeys(lines))


def checkpoint_bytes(sweep: SweepFile, estimates: list[TrialEstimate]) -> tuple[float, float]:
    """(peak while running, kept after the sweep) bytes of checkpoints; the peak is that of the largest
    `max_concurrent_trials` trials (all of them when it is unset) holding their checkpoints at once, plus what
    the finished ones keep: an upper bound the cluster's size may never reach."""
    keep = sweep.checkpoints.keep_last
    running = sweep.max_concurrent_trials or len(estimates)
    per_trial_running, per_trial_final = [], []
    for e in estimates:
        params = (e.size_b or 0) * 1e9
        dtype = e.point.config.model.dtype
        per_trial_running.append(params * BYTES_PER_PARAM[dtype] * keep)
        final = {"full": params * BYTES_PER_PARAM[dtype] * keep, "weights": params * FINAL_BYTES_PER_PARAM[dtype],
                 "none": 0.0}[sweep.checkpoints.when_done]
        per_trial_final.append(final)
    biggest_running = sorted(per_trial_running, reverse=True)[:running]
    return sum(per_trial_final) + sum(biggest_running), sum(per_trial_final)


def plan_table(sweep: SweepFile, estimates: list[TrialEstimate]) -> Table:
    """One row per trial; with a measured estimate, its hours per part (PARTS) too."""
    res = sweep.trial_resources
    unit = "GPU-h" if res.gpus else "CPU-h"
    parts = [p for p in PARTS if any(p in e.phase_hours for e in estimates)]
    table = Table(title=f"sweep {sweep.name}: {len(estimates)} trials ({grid_words(sweep)}), "
                  f"each {res.gpus} GPUs, {res.cpus} CPUs, {res.sandbox_workers} sandbox workers",
                  title_justify="left")
    for column in ("trial", "size (B)", "steps", "tokens", unit, *(PART_TITLES[p] for p in parts), "estimate from"):
        table.add_column(column, justify="left" if column in ("trial", "estimate from") else "right")
    for e in estimates:
        table.add_row(e.point.trial_id, "-" if e.size_b is None else f"{e.size_b:g}", str(e.point.config.steps),
                      f"{e.tokens / 1e6:.1f}M" if e.tokens >= 1e5 else f"{e.tokens / 1e3:.0f}k",
                      "-" if e.device_hours is None else (
                          f"({_hours(e.device_hours)})" if e.shared_with else _hours(e.device_hours)),
                      *(_hours(e.phase_hours[p]) if p in e.phase_hours else "-" for p in parts),
                      f"shared: trained by {e.shared_with}, not counted" if e.shared_with else e.source)
    return table


def grid_words(sweep: SweepFile) -> str:
    """The grid in words, each model with its own seed count: '2 models x 6 contexts x 3 seeds', or
    'qwen3-8b: 6 contexts x 3 seeds, olmo-3-7b-instruct: 6 x 2' when the models' seeds differ."""
    def n(count: int, noun: str) -> str:
        return f"{count} {noun}" + ("s" if count != 1 else "")

    seeds = [len(m.seeds or sweep.seeds) for m in sweep.models]
    contexts = n(len(sweep.contexts), "context")
    if len(set(seeds)) == 1:
        return f"{n(len(sweep.models), 'model')} x {contexts} x {n(seeds[0], 'seed')}"
    first, *rest = [(model_label(m), k) for m, k in zip(sweep.models, seeds)]
    return ", ".join([f"{first[0]}: {contexts} x {n(first[1], 'seed')}",
                      *(f"{label}: {len(sweep.contexts)} x {k}" for label, k in rest)])


def mark_shared(estimates: list[TrialEstimate], shared: dict[str, str]) -> list[TrialEstimate]:
    """The estimates with `shared_with` set for the trial ids that `shared` maps to the sweep training them."""
    return [dataclasses.replace(e, shared_with=shared[e.point.trial_id]) if e.point.trial_id in shared else e
            for e in estimates]


def _hours(h: float) -> str:
    return f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------ GPU memory


@dataclass
class ModelMemory:
    """One model of a GPU sweep on the sweep's GPUs: its fullest grid point's memory, and why it does not fit."""

    index: int  # in the sweep's models
    label: str
    path: str
    memory: TrialMemory
    problem: str | None  # one line naming the settings, or None when it fits


def gpu_name(sweep: SweepFile) -> str:
    return sweep.trial_resources.gpu or "GPU"


def memory_estimates(sweep: SweepFile, points: list[GridPoint]) -> list[ModelMemory]:
    """Per model of a sweep whose trials run on GPUs of known memory (resources.gpu or gpu_memory_gib), the
    grid point with the highest rank-0 peak (orchestrator/gpu_memory.py); [] otherwise. Raises SweepError
    when a model's config.json cannot be found (the message says how to provide it)."""
    gpu_bytes = sweep.trial_resources.memory_per_gpu_bytes
    if gpu_bytes is None:
        return []
    out = []
    for index, model in enumerate(sweep.models):
        label = model_label(model)
        cuda_points = [p for p in points if p.model == label and p.config.device == "cuda"]
        if not cuda_points:
            continue
        shape = read_model_shape(model.path)
        memories = [estimate_trial_memory(shape, p.config, gpu_bytes=gpu_bytes) for p in cuda_points]
        worst = max(memories, key=lambda m: max(m.rank0.values()))
        out.append(ModelMemory(index, label, model.path, worst, fit_problem(worst, gpu_name(sweep))))
    return out


def check_memory(sweep_path: Path, sweep: SweepFile, memories: list[ModelMemory]) -> None:
    """Refuse, in one line naming the settings, a sweep a trial of which cannot fit its GPUs."""
    res = sweep.trial_resources
    for m in memories:
        if m.problem is not None:
            raise SweepError(f"{sweep_path}: models[{m.index}] ({m.path}) does not fit {res.gpus} x "
                             f"{gpu_name(sweep)}: {m.problem}")


def memory_table(sweep: SweepFile, m: ModelMemory) -> Table:
    """One model's memory per GPU (GiB): its parts with the settings that change them, then each phase's total."""
    mem = m.memory
    acts, vllm, states = mem.activations, mem.vllm, mem.states
    others = mem.world_size > 1
    table = Table(title=f"GPU memory of {m.label} ({m.path}: {mem.parameters / 1e9:.2f}B parameters) per "
                  f"{gpu_name(sweep)} of {mem.gpu_bytes / GiB:.1f} GiB, in GiB", title_justify="left")
    table.add_column("part")
    table.add_column("rank 0", justify="right")
    if others:
        table.add_column(f"ranks 1-{mem.world_size - 1}", justify="right")
    table.add_column("set by")

    def row(title: str, rank0: float | None, other: float | None, setting: str, style: str | None = None) -> None:
        cells = [title, _gib_cell(rank0)] + ([_gib_cell(other)] if others else []) + [setting]
        table.add_row(*cells, style=style)

    zero = f"ZeRO-{mem.zero_stage} over {mem.world_size} rank{'s' * (mem.world_size > 1)}"
    row(f"student weights ({zero})", states.weights, states.weights, "model.dtype, deepspeed.zero_stage")
    row("student gradients", states.gradients, states.gradients, "deepspeed.zero_stage, deepspeed.bf16")
    row("optimizer states", states.optimizer, states.optimizer, "deepspeed.zero_stage")
    row("self-teacher" + (" (on the host)" if mem.teacher_loaded else ""), mem.teacher, mem.teacher,
        "teacher.offload")
    everywhere = mem.engines_everywhere
    row("process overhead (CUDA, NCCL)", PROCESS_OVERHEAD_BYTES * 2, PROCESS_OVERHEAD_BYTES * (1 + everywhere), "")
    row("vLLM share: weights", vllm.weights, vllm.weights if everywhere else None, "model.dtype, rollout.engines")
    row("vLLM share: working memory", vllm.working, vllm.working if everywhere else None, "")
    row(f"vLLM share: KV cache, {vllm.sequences:.1f} x {vllm.max_model_len:,} tokens", vllm.kv_cache,
        vllm.kv_cache if everywhere else None, "rollout.gpu_memory_utilization")
    row(f"forward without gradient ({acts.tokens_teacher:,} tokens)", acts.no_grad_forward + mem.teacher_loaded,
        acts.no_grad_forward + mem.teacher_loaded, "optim.micro_batch_size, context.max_teacher_prompt_tokens")
    row(f"student forward+backward ({acts.tokens_student:,} tokens)", acts.student_forward_backward,
        acts.student_forward_backward, "optim.gradient_checkpointing, rollout.max_response_tokens")
    row("loss", acts.loss, acts.loss, "loss.chunk_size")
    row("EMA update", mem.ema_update, mem.ema_update, "teacher.offload")
    rank0_peak, other_peak = mem.peak(True)[0], (mem.peak(False)[0] if others else None)
    for phase in PHASES:
        vllm_state = "" if phase in ("rollout", "push_and_ema") else (
            ", vLLM asleep" if mem.sleep else ", vLLM awake")
        row(f"phase: {PHASE_TITLES[phase]}{vllm_state}", mem.rank0[phase], mem.other_ranks.get(phase),
            "rollout.sleep_between_phases" if vllm_state else "",
            style="bold" if phase in (rank0_peak, other_peak) else None)
    return table


def memory_line(m: ModelMemory) -> str:
    phase, peak = m.memory.peak()
    if m.problem is not None:
        return f"{m.label} does not fit: {m.problem}"
    return (f"{m.label} fits: rank 0 peaks at {peak / GiB:.1f} of {m.memory.gpu_bytes / GiB:.1f} GiB "
            f"({PHASE_TITLES[phase]}); the vLLM KV cache holds {m.memory.vllm.sequences:.1f} sequences of "
            f"{m.memory.vllm.max_model_len:,} tokens")


def _gib_cell(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f}"
