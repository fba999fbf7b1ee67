"""Per-GPU memory of a trial, phase by phase, from the model's config.json and the trial settings alone.

No weights are read and nothing here imports torch: `opsd sweep plan` and `opsd sweep run` call it on the
driver before any GPU-hour is spent, and a run on a GPU compares each phase's measured peak with it.
Every figure is bytes on one GPU. Rank 0's GPU also holds a vLLM engine, so it is the fullest; ranks 1..N-1
hold their trainer process and, with `rollout.engines: every_rank` (the default), an engine of their own
(trainer/runtime.py): then every GPU holds what rank 0's does.

What each part is, and where its formula comes from:

- **Parameters**: `ModelShape.parameters` (orchestrator/model_shape.py, from config.json).
- **Student model states** (`model_states`): DeepSpeed's estimators, `estimate_zero2_model_states_mem_needs`
  and `estimate_zero3_model_states_mem_needs` (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py, GPU
  without offload): ZeRO-2 `2 P + 18 P / N` (16-bit weights; 2 + 4 bytes of 16- and 32-bit gradients, 4 + 8
  of fp32 master weights and Adam moments, partitioned over N ranks), ZeRO-3 `4 x largest layer + 18 P / N`.
  DeepSpeed has none for stages 0 and 1; the same byte accounting gives `2 P + 18 P` (nothing partitioned)
  and `2 P + 2 P + 16 P / N` (16-bit gradients whole). Without bf16 mixed precision (`deepspeed.bf16: false`)
  the weights, gradients and both Adam moments are in model.dtype, with no master copy.
- **Self-teacher** (trainer/teacher.py): a copy of the initial model in model.dtype on every rank. Its fp32
  master (when that dtype is not float32) lives in host memory on a GPU trial, not on the GPU. With
  `teacher.offload` the weights live on the host too; they come to the GPU for each teacher forward, and a
  copy of the LM head for the fused loss.
- **vLLM** (rank 0, and every rank with `rollout.engines: every_rank`): its share is `gpu_memory_utilization x`
  the GPU's memory (vllm/v1/worker/utils.py, `request_memory`). Inside it: the weights in model.dtype, its
  profiling run's working memory (the larger of a forward of `max_num_batched_tokens` tokens and a sampler pass
  over `max_num_seqs` rows of V logits: vLLM's defaults for the LLM class, 16,384 and 1,024 on GPUs of 70 GiB and
  more, else 8,192 and 256, vllm/engine/arg_utils.py), and the KV cache in the rest. One sequence of
  `max_model_len` tokens (the longest prompt, student or teacher, plus the longest response, capped at the
  model's `max_position_embeddings`, as trainer/runtime.py asks) needs `2 x kv_heads x head_dim x dtype bytes`
  per token in every full-attention layer, and in a sliding-window layer at most
  `window - 1 + max_num_batched_tokens` tokens (vllm/v1/kv_cache_interface.py); the engine refuses to start
  when its cache cannot hold one. Asleep (`rollout.sleep_between_phases`) it keeps its process's CUDA context
  and, counted here, its working memory.
- **Activations** of one micro-batch of `optim.micro_batch_size` rows at the longest response, after the
  longest prompt. Per decoder layer and token the forward keeps (model.dtype) its input, two norm outputs,
  q/k/v, the q/k norms' and rotary outputs, the attention output, o_proj's output, the residual, the MLP's
  gate, up, activation and product, and down's output; plus float32 copies in the RMS norms. With gradient
  checkpointing (as trainer/student.py enables it: per decoder layer) only each layer's input is kept, and
  one layer is recomputed in the backward, counted twice (its activations and their gradients). Rows of
  different lengths are padded, and SDPA then gets a boolean [B, T, T] mask. The forwards without gradient
  (the teacher's; the student's old log-probs) hold one layer's activations at a time.
- **The loss** (trainer/head_loss.py): the teacher's last hidden states [B, R, H], the gradient to the
  student's [B, R, H], the head weight's gradient [V, H] in float32, and `LOSS_VOCAB_TENSORS` float32
  [chunk_size, V] tensors per chunk; unfused (`loss.chunk_size: null`) both sides' [B, R, V] logits in
  model.dtype and the same float32 tensors over every position at once (trainer/losses.py).
- **EMA update** (trainer/teacher.py, `update`): with a float32 teacher on the GPU, per parameter a float32
  copy of the student's tensor, its difference to the teacher, and that difference in float64 and squared:
  24 bytes x the largest parameter. A bf16 teacher's update runs on its host master: nothing on the GPU.
- **Process overhead**: `PROCESS_OVERHEAD_BYTES` per process on the GPU (the trainer on every rank, vLLM's
  worker on rank 0): CUDA context, cuBLAS workspace, NCCL buffers.

The phases, each the sum of what is on the GPU at once: the rollout (and the evaluations) with vLLM awake;
the teacher forward; the student forward and backward with the loss; the weight push and EMA update with
vLLM awake again. Each sums its parts as if their peaks met, so it errs on the high side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from orchestrator.model_shape import ModelShape, read_model_shape
from trainer.config import TrialConfig

GiB = 2**30
# Memory of one GPU as torch.cuda reports it (`total_memory`; "GPU 0 has a total capacity of ..." in an
# out-of-memory error): B200 178.35 GiB (nvidia-smi: 183,359 MiB), H100 80 GB 79.1 GiB (79.1-79.3 by
# driver and board).
GPU_MEMORY_GIB: dict[str, float] = {"B200": 178.35, "H100": 79.1}
# One process's CUDA context, cuBLAS workspace and NCCL buffers: an allowance, until a GPU run measures it.
PROCESS_OVERHEAD_BYTES = 1 * GiB
# float32 [rows, V] tensors the loss holds at once, both sides together (trainer/losses.py `_position_terms`:
# each side's scaled logits, the top-k tail's masked copy and its logsumexp's temporary; the student's
# gradient and its softmax in the backward).
LOSS_VOCAB_TENSORS = 8
# vLLM's sampler over one row of V logits: float32 logits, probabilities and log-probs (logprobs_mode
# "processed_logprobs"), and top-p's sort (float32 values, int64 indices).
VLLM_SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 4 + 4 + 8
# Bytes per parameter the EMA update allocates for the largest parameter (module docstring).
EMA_UPDATE_BYTES_PER_PARAM = 4 + 4 + 8 + 8
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


# ----------------------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class ModelStates:
    """The student's weights, gradients and optimizer states on one GPU (bytes)."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def model_states(parameters: int, largest_layer: int, *, zero_stage: int, world_size: int, mixed: bool,
                 dtype_bytes: int) -> ModelStates:
    """Per-GPU model states under DeepSpeed (module docstring); with `mixed` (bf16 mixed precision) the totals
    of stages 2 and 3 are DeepSpeed's estimators' GPU figures without offload, to the byte."""
    p, n = parameters, world_size
    if mixed:  # bytes per parameter, as DeepSpeed's estimator splits its 18
        weight, grad16, grad32, optim = 2, 2, 4, 4 + 8
    else:
        weight, grad16, grad32, optim = dtype_bytes, dtype_bytes, 0, 2 * dtype_bytes
    # (whole, partitioned) bytes per parameter of weights, gradients and optimizer states, by stage. ZeRO-3's
    # partition counts the 16-bit weights where ZeRO-2's counts the 16-bit gradients (DeepSpeed's 18 either way).
    if zero_stage == 0:
        whole, part = (weight, grad16 + grad32, optim), (0, 0, 0)
    elif zero_stage == 1:
        whole, part = (weight, grad16, 0), (0, grad32, optim)
    elif zero_stage == 2:
        whole, part = (weight, 0, 0), (0, grad16 + grad32, optim)
    elif zero_stage == 3:
        whole, part = (0, 0, 0), (weight, grad32 if mixed else grad16, optim)
    else:
        raise ValueError(f"unknown ZeRO stage {zero_stage}")
    # DeepSpeed rounds the partitioned total once: int(18 * total_params / total_gpus).
    partitioned = int(sum(part) * p / n)
    weights = whole[0] * p + int(part[0] * p / n) + (4 * largest_layer if zero_stage == 3 else 0)
    gradients = whole[1] * p + int(part[1] * p / n)
    optimizer = whole[2] * p + partitioned - int(part[0] * p / n) - int(part[1] * p / n)
    return ModelStates(weights, gradients, optimizer)


@dataclass(frozen=True)
class VllmMemory:
    """rank 0's vLLM engine (bytes), inside its share `share` of the GPU."""

    share: int
    weights: int
    working: int
    max_model_len: int
    kv_per_sequence: int  # one max_model_len sequence
    max_num_batched_tokens: int
    max_num_seqs: int

    @property
    def kv_cache(self) -> int:
        return self.share - self.weights - self.working

    @property
    def sequences(self) -> float:
        """Full-length sequences the KV cache holds at once."""
        return self.kv_cache / self.kv_per_sequence if self.kv_per_sequence else math.inf


def vllm_memory(shape: ModelShape, cfg: TrialConfig, *, gpu_bytes: int) -> VllmMemory:
    p = DTYPE_BYTES[cfg.model.dtype]
    big_gpu = gpu_bytes >= 70 * GiB
    batched, seqs = (16384, 1024) if big_gpu else (8192, 256)
    max_model_len = max(cfg.rollout.max_prompt_tokens, cfg.context.max_teacher_prompt_tokens) \
        + cfg.rollout.max_response_tokens
    max_model_len = min(max_model_len, shape.max_position_embeddings or max_model_len)
    # One layer at a time: gate/up and their product, q/k/v, the residual stream and norms.
    forward = batched * (3 * shape.intermediate_size + shape.q_width + 2 * shape.kv_width + 4 * shape.hidden_size) \
        * p
    sampler = seqs * shape.vocab_size * VLLM_SAMPLER_BYTES_PER_LOGIT
    return VllmMemory(
        share=math.ceil(gpu_bytes * cfg.rollout.gpu_memory_utilization), weights=shape.parameters * p,
        working=max(forward, sampler), max_model_len=max_model_len,
        kv_per_sequence=shape.kv_bytes(max_model_len, dtype_bytes=p, max_num_batched_tokens=batched),
        max_num_batched_tokens=batched, max_num_seqs=seqs)


def layer_activation_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes one decoder layer's forward keeps per token (module docstring)."""
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_width, shape.kv_width
    in_dtype = 6 * h + 4 * i + 4 * (q + kv)  # x, 2 norms, o_proj, residual, down; MLP; q/k/v, norms, rotary, attn
    in_float32 = 2 * h + (q + kv if shape.qk_norm_params else 0)  # RMS norms compute in float32
    return in_dtype * dtype_bytes + in_float32 * 4


@dataclass(frozen=True)
class Activations:
    """One micro-batch's memory beyond the model states (bytes), by phase."""

    tokens_student: int  # per row: longest prompt + longest response
    tokens_teacher: int
    no_grad_forward: int  # the teacher's forward (and the student's old log-probs)
    student_forward_backward: int  # stored + recomputed layers, attention mask
    loss: int


def activations(shape: ModelShape, cfg: TrialConfig) -> Activations:
    # The teacher computes in model.dtype; DeepSpeed casts the student to bf16 with deepspeed.bf16.
    p = DTYPE_BYTES[cfg.model.dtype]
    ps = 2 if cfg.deepspeed.bf16 else p
    rows = cfg.optim.micro_batch_size
    response = cfg.rollout.max_response_tokens
    t_student = cfg.rollout.max_prompt_tokens + response
    t_teacher = cfg.context.max_teacher_prompt_tokens + response
    h, v = shape.hidden_size, shape.vocab_size
    per_layer = layer_activation_bytes(shape, ps)

    def mask(tokens: int) -> int:
        return rows * tokens * tokens if rows > 1 else 0  # padded rows: SDPA gets a boolean [B, T, T] mask

    # The teacher at its longest; the student's old log-probs (also without gradient) are no longer.
    longest = max(t_student, t_teacher)
    no_grad = rows * longest * (layer_activation_bytes(shape, p) + h * p) + mask(longest) + rows * response * h * p
    if cfg.optim.gradient_checkpointing:
        stored = shape.num_layers * rows * t_student * h * ps + 2 * rows * t_student * per_layer
    else:
        stored = shape.num_layers * rows * t_student * per_layer + rows * t_student * per_layer
    teacher_hidden = rows * response * h * p
    if cfg.loss.chunk_size is not None:
        loss = (teacher_hidden + rows * response * h * ps + v * h * 4
                + LOSS_VOCAB_TENSORS * min(cfg.loss.chunk_size, rows * response) * v * 4)
        if cfg.teacher.offload:
            loss += v * h * p  # the teacher's head, copied to the GPU for the loss
    else:
        loss = teacher_hidden + rows * response * v * (ps + p) + LOSS_VOCAB_TENSORS * rows * response * v * 4
    return Activations(t_student, t_teacher, no_grad, stored + mask(t_student), loss)


# ----------------------------------------------------------------------------------------- the phases

PHASES = ("rollout", "teacher_forward", "student_forward_backward", "push_and_ema")
PHASE_TITLES = {"rollout": "rollout, evaluation", "teacher_forward": "teacher forward",
                "student_forward_backward": "student forward+backward", "push_and_ema": "weight push, EMA update"}


@dataclass(frozen=True)
class TrialMemory:
    """A trial's memory on one GPU (bytes): its parts, and each phase's peak on rank 0 and on the others."""

    model: str
    shape: ModelShape
    gpu_bytes: int
    world_size: int
    zero_stage: int
    states: ModelStates
    teacher: int  # resident between forwards
    teacher_loaded: int  # brought to the GPU for a teacher forward (offload)
    activations: Activations
    ema_update: int
    vllm: VllmMemory
    sleep: bool
    engines_everywhere: bool  # rollout.engines every_rank: the other ranks hold an engine too
    rank0: dict[str, int] = field(default_factory=dict)  # PHASES -> bytes on rank 0's GPU
    other_ranks: dict[str, int] = field(default_factory=dict)  # PHASES -> bytes on each other rank's; {} for one

    @property
    def parameters(self) -> int:
        return self.shape.parameters

    @property
    def trainer_resident(self) -> int:
        return self.states.total + self.teacher + PROCESS_OVERHEAD_BYTES

    @property
    def vllm_awake(self) -> int:
        return self.vllm.share + PROCESS_OVERHEAD_BYTES

    @property
    def vllm_asleep(self) -> int:
        return PROCESS_OVERHEAD_BYTES + self.vllm.working

    def peak(self, rank0: bool = True) -> tuple[str, int]:
        phases = self.rank0 if rank0 else self.other_ranks
        name = max(phases, key=phases.get)
        return name, phases[name]


def estimate_trial_memory(shape: ModelShape, cfg: TrialConfig, *, gpu_bytes: int) -> TrialMemory:
    """Each phase's peak bytes on rank 0's GPU (trainer + vLLM) and on the other ranks' (trainer, and vLLM
    with an engine on every rank)."""
    p = DTYPE_BYTES[cfg.model.dtype]
    mixed = cfg.deepspeed.bf16
    states = model_states(shape.parameters, shape.largest_layer, zero_stage=cfg.deepspeed.zero_stage,
                          world_size=cfg.deepspeed.world_size, mixed=mixed, dtype_bytes=2 if mixed else p)
    # The teacher is copied from the model as loaded (model.dtype), before DeepSpeed casts the student; its fp32
    # master, if any, is on the host.
    teacher_bytes = shape.parameters * p
    teacher, teacher_loaded = (0, shape.parameters * p) if cfg.teacher.offload else (teacher_bytes, 0)
    acts = activations(shape, cfg)
    ema = 0 if cfg.teacher.offload or p != 4 else EMA_UPDATE_BYTES_PER_PARAM * shape.largest_parameter
    if cfg.deepspeed.zero_stage == 3:
        ema += max(shape.largest_parameter, 1 << 27) * 2  # a gathered bucket (trainer/student.py)
    vllm = vllm_memory(shape, cfg, gpu_bytes=gpu_bytes)
    parts = TrialMemory(model=cfg.model.path, shape=shape, gpu_bytes=gpu_bytes, world_size=cfg.deepspeed.world_size,
                        zero_stage=cfg.deepspeed.zero_stage, states=states, teacher=teacher,
                        teacher_loaded=teacher_loaded, activations=acts, ema_update=ema, vllm=vllm,
                        sleep=cfg.rollout.sleep_between_phases,
                        engines_everywhere=cfg.rollout.engines == "every_rank")
    resident = parts.trainer_resident
    trainer = {"rollout": resident,
               "teacher_forward": resident + teacher_loaded + acts.no_grad_forward,
               "student_forward_backward": resident + acts.student_forward_backward + acts.loss,
               "push_and_ema": resident + ema}
    # The push wakes a sleeping engine before the EMA update; it sleeps from after the rollouts to the push.
    training_engine = parts.vllm_asleep if parts.sleep else parts.vllm_awake
    engine = {"rollout": parts.vllm_awake, "teacher_forward": training_engine,
              "student_forward_backward": training_engine, "push_and_ema": parts.vllm_awake}
    with_engine = {phase: trainer[phase] + engine[phase] for phase in PHASES}
    others = with_engine if parts.engines_everywhere else trainer
    return dataclasses.replace(parts, rank0=with_engine, other_ranks=others if parts.world_size > 1 else {})


def trial_memory(cfg: TrialConfig, *, gpu_bytes: int) -> TrialMemory:
    """`estimate_trial_memory` of the trial's own model (`cfg.model.path`: a folder, or a hub id whose
    config.json is cached or known), on GPUs of `gpu_bytes` each: what a run on a GPU compares its measured
    peaks with (`torch.cuda.mem_get_info()[1]` gives the GPU's bytes)."""
    return estimate_trial_memory(read_model_shape(cfg.model.path), cfg, gpu_bytes=gpu_bytes)


# ------------------------------------------------------------------------------------------ the verdict


def fit_problem(memory: TrialMemory, gpu_name: str) -> str | None:
    """None when the trial fits its GPUs, else one line naming the settings that would make it fit."""
    cfg_hint = "rollout.gpu_memory_utilization"
    vllm = memory.vllm
    if vllm.kv_cache < vllm.kv_per_sequence:
        return (f"{cfg_hint} {vllm.share / memory.gpu_bytes:.2f} of {gpu_name} gives vLLM {_gib(vllm.share)} GiB, "
                f"which after its weights ({_gib(vllm.weights)}) and working memory ({_gib(vllm.working)}) leaves "
                f"{_gib(max(vllm.kv_cache, 0))} GiB of KV cache, less than one {vllm.max_model_len:,}-token "
                f"sequence needs ({_gib(vllm.kv_per_sequence)} GiB): raise {cfg_hint} or shorten "
                "rollout.max_response_tokens / context.max_teacher_prompt_tokens")
    for rank0, phases in ((True, memory.rank0), (False, memory.other_ranks)):
        if not phases:
            continue
        phase, peak = max(phases.items(), key=lambda item: item[1])
        if peak <= memory.gpu_bytes:
            continue
        parts = _phase_parts(memory, phase, rank0)
        listed = ", ".join(f"{title} {_gib(size)} ({setting})"
                           for title, size, setting in sorted(parts, key=lambda part: -part[1]) if size > 0)
        who = "rank 0" if rank0 else "ranks 1-" + str(memory.world_size - 1)
        return (f"{who} needs {_gib(peak)} GiB in the {PHASE_TITLES[phase]} phase, more than one {gpu_name}'s "
                f"{_gib(memory.gpu_bytes)} GiB: {listed}")
    return None


def _phase_parts(memory: TrialMemory, phase: str, rank0: bool) -> list[tuple[str, int, str]]:
    """(title, bytes, the setting that changes it) of what `phase` holds."""
    acts = memory.activations
    parts = [("model states", memory.states.total, "deepspeed.zero_stage"),
             ("self-teacher", memory.teacher, "teacher.offload")]
    if phase == "teacher_forward":
        parts.append(("forward activations", acts.no_grad_forward + memory.teacher_loaded,
                      "optim.micro_batch_size, rollout.max_response_tokens"))
    elif phase == "student_forward_backward":
        parts.append(("activations", acts.student_forward_backward,
                      "optim.gradient_checkpointing, optim.micro_batch_size, rollout.max_response_tokens"))
        parts.append(("loss", acts.loss, "loss.chunk_size"))
    elif phase == "push_and_ema":
        parts.append(("EMA update", memory.ema_update, "teacher.offload"))
    if rank0 or memory.engines_everywhere:
        awake = phase in ("rollout", "push_and_ema") or not memory.sleep
        vllm = memory.vllm_awake if awake else memory.vllm_asleep
        setting = "rollout.gpu_memory_utilization" + ("" if memory.sleep else ", rollout.sleep_between_phases")
        parts.append(("vLLM", vllm, setting))
    return parts


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"
