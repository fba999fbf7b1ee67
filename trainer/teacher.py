"""The EMA self-teacher (METHOD.md section 1, steps 4 and 8).

A frozen copy of the student's network (no gradient, eval mode) whose weights follow the student as
θ̄ ← (1 − r)·θ̄ + r·θ once per trial step, after the optimizer steps. r = 0 keeps the initial model bit for
bit (the update is skipped); r = 1 copies the student. The arithmetic is (1 − r)·θ̄ then + r·θ in float32:
when the teacher computes in a lower precision (bf16 on GPU) an fp32 master copy of θ̄ is kept, because
r·(θ − θ̄) with r = 0.01 is mostly below bf16's resolution and the teacher would never move. On a GPU that
master lives in host memory: on the GPU it would cost 4 bytes per parameter on every rank (32 GB for an 8B
model, beside the student's ZeRO state, activations and vLLM's share), and it is read once per step, so the
update moves each parameter to the host and back (a few seconds for 8B, against minutes of training).
The update does not synchronise with the device per parameter: the distance it reports is summed on the
device and read once.

The student's weights arrive as (name, full tensor) pairs — `Student.named_full_parameters()`, which
gathers ZeRO-3 partitions — so the teacher works with every ZeRO stage; under several ranks every rank
holds its own identical teacher and calls `update` (the gather is collective).

Offload keeps the teacher's weights on the CPU and moves them to the GPU around forwards (`loaded()`);
on a CPU trial the weights already live there, so offload changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, Iterator

import torch
from torch import nn

from trainer.distributed import rank_device
from trainer.errors import TeacherError
from trainer.lm_head import LMHead, final_hidden_states, lm_head
from trainer.options import Device


class EmaTeacher:
    """Frozen EMA copy of the student. Build it from the initial model *before* the Student wraps it."""

    def __init__(self, model: nn.Module, *, ema_rate: float, offload: bool = False,
                 device: Device | torch.device = "cpu") -> None:
        if not 0.0 <= ema_rate <= 1.0:
            raise TeacherError(f"ema_rate must be in [0, 1], got {ema_rate}")
        if any(hasattr(param, "ds_id") for param in model.parameters()):
            raise TeacherError("the teacher needs an unpartitioned model: copy it before the ZeRO-3 Student wraps it")
        self.ema_rate = float(ema_rate)
        # This rank's GPU under several ranks ("cuda" alone would be whichever GPU is current).
        self.device = device if isinstance(device, torch.device) else rank_device(device)
        self.offload = offload and self.device.type != "cpu"
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = False
        self.model.to("cpu" if self.offload else self.device)
        self._params = dict(self.model.named_parameters())
        self._master: dict[str, torch.Tensor] | None = None
        if any(param.dtype != torch.float32 for param in self._params.values()):
            self._master = {name: param.detach().to("cpu", torch.float32, copy=True)
                            for name, param in self._params.items()}
        self._loaded_depth = 0

    @classmethod
    def from_model(cls, model: nn.Module, *, ema_rate: float, offload: bool = False,
                   device: Device | torch.device = "cpu") -> "EmaTeacher":
        """A teacher holding a deep copy of `model` (which stays usable for the Student)."""
        return cls(copy.deepcopy(model), ema_rate=ema_rate, offload=offload, device=device)

    @contextlib.contextmanager
    def loaded(self) -> Iterator[None]:
        """Weights on the compute device for the body (nestable); with offload, back on the CPU afterwards."""
        if self.offload and self._loaded_depth == 0:
            self.model.to(self.device)
        self._loaded_depth += 1
        try:
            yield
        finally:
            self._loaded_depth -= 1
            if self.offload and self._loaded_depth == 0:
                self.model.to("cpu")

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None, *, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, V] of `input_ids` [B, T] (teacher prompt + response), computed without gradient;
        [B, k, V] of the last k positions with `logits_to_keep` = k > 0 (as `Student.forward_logits`)."""
        with torch.no_grad(), self.loaded():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, logits_to_keep=logits_to_keep)
        return out.logits

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None, *, hidden_to_keep: int = 0) -> torch.Tensor:
        """The last hidden states [B, T, H] ([B, k, H] with `hidden_to_keep` = k > 0) that `forward_logits` would
        put through the LM head, without gradient (as `Student.forward_hidden`)."""
        def forward(**kwargs):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **kwargs)

        with torch.no_grad(), self.loaded():
            return final_hidden_states(self.model, forward, keep=hidden_to_keep)

    def lm_head(self) -> LMHead:
        """The LM head's weights (frozen), on the compute device: with offload, a copy (the model's weights
        return to the CPU after each forward)."""
        head = lm_head(self.model)
        return LMHead(head.weight.to(self.device), None if head.bias is None else head.bias.to(self.device))

    @torch.no_grad()
    def update(self, student_parameters: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """θ̄ ← (1 − r)·θ̄ + r·θ from (name, full tensor) pairs covering every teacher parameter.

        Returns `teacher_ema_rate` and `teacher_student_l2` (‖θ̄ − θ‖ after the update). The pairs arrive
        lazily (a ZeRO-3 gather), so a TeacherError about a missing or unknown name comes after the others
        were averaged: the trial must stop, not carry on with that teacher.
        """
        r = self.ema_rate
        seen: set[str] = set()
        sq_dist: torch.Tensor | float = 0.0  # a tensor on the first parameter's device, read once at the end
        for name, student_param in student_parameters:
            if name not in self._params:
                raise TeacherError(f"student parameter {name!r} has no counterpart in the teacher")
            param = self._params[name]
            target = self._master[name] if self._master is not None else param.data
            if student_param.shape != target.shape:
                raise TeacherError(f"{name}: student shape {tuple(student_param.shape)} != teacher {tuple(target.shape)}")
            new = student_param.detach().to(device=target.device, dtype=target.dtype)
            if r == 0.0:
                pass  # frozen teacher: keep the initial weights exactly
            elif r == 1.0:
                target.copy_(new)
            else:
                target.mul_(1.0 - r)
                target.add_(new * r)
            if self._master is not None and r != 0.0:
                param.data.copy_(target)
            sq_dist = sq_dist + (target - new).double().pow(2).sum()
            seen.add(name)
        missing = set(self._params) - seen
        if missing:
            raise TeacherError(f"student parameters missing for the teacher: {sorted(missing)[:5]}")
        return {"teacher_ema_rate": r, "teacher_student_l2": math.sqrt(float(sq_dist))}

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, live weight) in the compute dtype, no copy: what the rollout engine needs for an evaluation
        (on the GPU, or on the host when offloaded; the weight push moves a bucket at a time). The fp32 master,
        where there is one, rounds to exactly these weights."""
        for name, param in self._params.items():
            yield name, param.detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights by HF parameter name, as CPU copies (the fp32 master copy when there is one)."""
        source = self._master if self._master is not None else {n: p.detach() for n, p in self._params.items()}
        return {name: tensor.to("cpu", copy=True) for name, tensor in source.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights written by `state_dict` (all names must match)."""
        if set(state) != set(self._params):
            raise TeacherError(f"teacher state names differ: missing {sorted(set(self._params) - set(state))[:5]}, "
                               f"unexpected {sorted(set(state) - set(self._params))[:5]}")
        for name, param in self._params.items():
            if self._master is not None:
                self._master[name].copy_(state[name])
            param.data.copy_(state[name])
