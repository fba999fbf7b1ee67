"""The student: a Hugging Face causal LM trained by a DeepSpeed engine (METHOD.md section 1, step 7).

One optimizer step of the trial = several micro batches, each `forward_logits` → loss → `backward`, then one
`step()`. The engine runs with caller-owned accumulation boundaries (`managed_gradient_accumulation: false`):
`step()` is the boundary, so a mini batch may hold any number of micro batches (the last mini batch of a
trial step is often smaller). `backward` does not rescale the loss: the caller passes each micro batch's
share of the mini batch's loss (e.g. for a token mean: the micro batch's token-sum over the mini batch's
token count). With several ranks DeepSpeed averages gradients over ranks, so each rank's shares must add up
to the mini batch's loss as that rank would compute it alone (its token-sum times world_size over the global
token count, for a token mean: every rank knows the whole mini batch, trainer/aggregation.py). With several
ranks, `split_minibatches(..., rank=, world_size=)` (trainer/minibatches.py) deals each rank its items.

Optimizer: AdamW with the hyperparameters of `OptimConfig`, one group holding every parameter (norm weights
and embeddings are decayed too; METHOD.md names no exempt group), constant learning rate, gradient clipping
by the global norm before the step. DeepSpeed builds `torch.optim.AdamW` (`"torch_adam": true`) on every
device: its own FusedAdam is compiled with nvcc at first use and refuses to build when nvcc's CUDA differs
from torch's; on CUDA torch's fused kernel (`"fused": true`) needs no compilation. Adam's eps is 1e-8
(torch's default).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.distributed import init_distributed
from trainer.errors import StudentError
from trainer.lm_head import LMHead, final_hidden_states, lm_head
from trainer.options import Device

ADAM_EPS = 1e-8
# Parameters gathered at once when a ZeRO-3 student is read whole (weight push, EMA update): bounds the
# extra memory to this many elements instead of a second full model.
GATHER_BUCKET_NUMEL = 1 << 27
_CHECKPOINT_TAG = "engine"


def build_deepspeed_config(optim: OptimConfig, ds: DeepSpeedConfig, *, device: Device, world_size: int) -> dict:
    """The DeepSpeed JSON config of the student (pure; tested and saved beside a trial's results)."""
    per_rank_mini = math.ceil(optim.mini_batch_size / world_size)
    grad_accum = max(1, math.ceil(per_rank_mini / optim.micro_batch_size))
    if device == "cpu":
        fused = False  # the path the CPU tests check bit for bit against a hand-written AdamW
    elif device == "cuda":
        fused = True
    else:
        raise StudentError(f"unknown device {device!r}")
    return {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        # Only DeepSpeed's sample bookkeeping reads this: step() is the boundary (unmanaged accumulation).
        "gradient_accumulation_steps": grad_accum,
        "managed_gradient_accumulation": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": ADAM_EPS,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
                "fused": fused,  # passed on to torch.optim.AdamW
            },
        },
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def iter_full_parameters(module: nn.Module, *, zero_stage: int,
                         bucket_numel: int = GATHER_BUCKET_NUMEL) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for each parameter of `module`, tied weights once.

    Under ZeRO-3 the partitions are gathered a bucket at a time and cloned (every rank must iterate: the
    gather is collective); otherwise the tensors are detached views of the live weights, valid until the
    next optimizer step.
    """
    named = list(module.named_parameters())
    if zero_stage != 3:
        for name, param in named:
            yield name, param.detach()
        return
    import deepspeed

    bucket: list[tuple[str, nn.Parameter]] = []
    bucket_size = 0
    for index, (name, param) in enumerate(named):
        bucket.append((name, param))
        bucket_size += param.ds_numel
        if bucket_size >= bucket_numel or index == len(named) - 1:
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                gathered = [(n, p.detach().clone()) for n, p in bucket]
            yield from gathered
            bucket, bucket_size = [], 0


def _undo_optimizer_warmup(optimizer: Any) -> None:
    """bf16 without ZeRO runs in DeepSpeed's FP16_UnfusedOptimizer (torch AdamW, CPU) or FP16_Optimizer
    (fused Adam, CUDA), whose constructors take one optimizer step on zero gradients to create the Adam
    state. That step decays the fp32 master weights once and counts a step, so the first real update would
    not be AdamW's first step (about 0.74 of it with betas (0.9, 0.999)). Undo both: masters again from the
    untouched low-precision weights, no state, no step count. (The CPU case is tested; the fused one is
    the same logic on the flat buffers.)"""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        pairs = [(master, low) for fp32_group, low_group in zip(optimizer.fp32_groups, optimizer.fp16_groups)
                 for master, low in zip(fp32_group, low_group)]
    elif isinstance(optimizer, FP16_Optimizer):
        pairs = list(zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat))
    else:
        return
    with torch.no_grad():
        for master, low in pairs:
            master.copy_(low)
    optimizer.optimizer.state.clear()
    for group in optimizer.optimizer.param_groups:
        group.pop("step", None)  # DeepSpeed's fused Adam counts steps per group


class Student:
    """A causal LM under a DeepSpeed engine; see the module docstring for the accumulation contract."""

    def __init__(self, model: nn.Module, *, optim: OptimConfig, deepspeed_config: DeepSpeedConfig,
                 device: Device = "cpu") -> None:
        import deepspeed
        from deepspeed.runtime.utils import clip_grad_norm_

        self.dist = init_distributed(device)
        if self.dist.world_size != deepspeed_config.world_size:
            raise StudentError(f"deepspeed.world_size is {deepspeed_config.world_size} but {self.dist.world_size} "
                               "trainer processes are running (start them with run_local_ranks, torchrun or Ray)")
        self.device = device
        self.zero_stage = deepspeed_config.zero_stage
        if optim.gradient_checkpointing:
            # Non-reentrant checkpointing works with inputs that need no grad and with ZeRO-3's hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        self.ds_config = build_deepspeed_config(optim, deepspeed_config, device=device,
                                                world_size=self.dist.world_size)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.ds_config)
        self.engine = engine
        self.engine.train()
        _undo_optimizer_warmup(engine.optimizer)
        self._micro_batches = 0
        self._clip_norm: float | None = None
        if self.zero_stage == 0 and not deepspeed_config.bf16:
            # DeepSpeed clips fp32 stage-0 gradients but drops the norm it computed; keep it for the metrics.
            def clip_and_record() -> None:
                norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                       mpu=engine.mpu)
                self._clip_norm = float(norm)

            engine.clip_fp32_gradients = clip_and_record

    @property
    def module(self) -> nn.Module:
        """The wrapped Hugging Face model (partitioned under ZeRO-3)."""
        return self.engine.module

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by `load_checkpoint`)."""
        return int(self.engine.global_steps)

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None, *, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, V] of packed rows `input_ids` [B, T] (prompt + response, right-padded).

        `position_ids` [B, T] default to 0..T-1 per row, which is right for right padding.
        `logits_to_keep` = k > 0 computes only the last k positions ([B, k, V]): with long prompts the
        [B, T, V] logits are most of the memory, and positions before the shortest prompt's last token
        predict no response token.
        """
        out = self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, logits_to_keep=logits_to_keep)
        return out.logits

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None, *, hidden_to_keep: int = 0) -> torch.Tensor:
        """The last hidden states [B, T, H] that `forward_logits` would put through the LM head ([B, k, H] of the
        last k positions with `hidden_to_keep` = k > 0), for a loss that applies `lm_head()` itself.

        The same forward through the engine, stopped before the head (trainer/lm_head.py).
        """
        def forward(**kwargs: Any) -> Any:
            return self.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, **kwargs)

        return final_hidden_states(self.engine.module, forward, keep=hidden_to_keep)

    def lm_head(self) -> LMHead:
        """The LM head's live parameters; the loss's gradient reaches them like any other parameter's."""
        if self.zero_stage == 3:
            raise StudentError("ZeRO-3 partitions the LM head's weight, which the fused loss reads whole: "
                               "set loss.chunk_size to null with deepspeed.zero_stage 3")
        return lm_head(self.engine.module)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro batch's share of the mini batch loss (no rescaling)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro_batches += 1

    def step(self) -> dict[str, Any]:
        """One optimizer step over the micro batches accumulated since the last step.

        Returns `grad_norm` (global norm before clipping, over all ranks), `lr` and `micro_batches`.
        """
        if self._micro_batches == 0:
            raise StudentError("step() without any backward() since the last step")
        self._clip_norm = None
        self.engine.step()
        norm = self._clip_norm if self._clip_norm is not None else self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = float(norm.item())
        metrics = {"grad_norm": None if norm is None else float(norm), "lr": float(self.engine.get_lr()[0]),
                   "micro_batches": self._micro_batches}
        self._micro_batches = 0
        return metrics

    def named_full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) per parameter, gathered under ZeRO-3 (collective: every rank iterates): what
        the weight push into vLLM, the EMA teacher's update and a full copy of the weights read."""
        return iter_full_parameters(self.engine.module, zero_stage=self.zero_stage)

    def save_checkpoint(self, save_dir: str | Path) -> None:
        """DeepSpeed checkpoint (weights, optimizer incl. ZeRO partitions, step counters); every rank calls."""
        if self._micro_batches:
            raise StudentError("save_checkpoint() between backward() and step() would lose gradients")
        self.engine.save_checkpoint(str(save_dir), tag=_CHECKPOINT_TAG, save_latest=False)

    def load_checkpoint(self, save_dir: str | Path) -> None:
        """Restore what `save_checkpoint` wrote into this (freshly built, same-config) student."""
        path, _ = self.engine.load_checkpoint(str(save_dir), tag=_CHECKPOINT_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=True)
        if path is None:
            raise StudentError(f"no student checkpoint in {save_dir}")
        self._micro_batches = 0
