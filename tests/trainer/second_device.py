"""A device that is not the CPU, on a machine that has only a CPU: tests of device placement.

A GPU trial fails at its first forward when one tensor of the step stays on the host (index tensors packed on
the CPU against a CUDA embedding, a CPU mask against CUDA log-probs). A CPU run never shows it: everything is
on the CPU. Here tensors can live on a second device, `accel`, whose data sits in host memory but whose
tensors report `device(type='accel')` and refuse, like CUDA, any operation that mixes them with host tensors.

- `OnDevice` is a wrapper tensor subclass: each operation unwraps its inputs, computes on the CPU and wraps the
  outputs. An operation that gets an `OnDevice` tensor and a host tensor with at least one dimension raises
  `DeviceMixError` naming the operation (0-dimensional host tensors are allowed, as CUDA allows them). Copies
  between the devices (`.to`, `copy_`) are allowed, as they are between host and GPU.
- `second_device()` is the context in which `.to(device)`, `nn.Module.to(device)` and factory functions with
  `device=accel` make `OnDevice` tensors.

The device is PyTorch's PrivateUse1 backend renamed `accel` with the Python device guard of
`torch.utils.backend_registration`: autograd needs a device guard for a non-CPU device, and the CUDA one aborts
the process on a CPU-only build. No aten kernel is registered for it: every operation goes through `OnDevice`.
On a GPU machine `scripts/gpu_check.sh` runs the same step on CUDA itself (`tests/trainer/test_device_placement.py`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE_TYPE = "accel"


class DeviceMixError(RuntimeError):
    """An operation got tensors of the second device and of the host."""


def _setup_backend() -> torch.device:
    if torch._C._get_privateuse1_backend_name() != DEVICE_TYPE:
        from torch.utils.backend_registration import _DummyBackendModule, _setup_privateuseone_for_python_backend

        class Module(_DummyBackendModule):
            def get_amp_supported_dtype(self) -> list[torch.dtype]:
                # Asked by every autocast-state query once the backend exists (activation checkpointing makes
                # one for each device type): this device offers no autocast.
                return []

        _setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=Module())
    return torch.device(DEVICE_TYPE, 0)


DEVICE = _setup_backend()


def _register_factories() -> torch.library.Library:
    """Composite operations (attention's math form, for one) allocate their outputs on their inputs' device
    from C++, below any Python mode: the backend's allocators make `OnDevice` tensors."""
    lib = torch.library.Library("aten", "IMPL")

    def empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
        return OnDevice(torch.empty(size, dtype=dtype, memory_format=memory_format))

    def empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
        return OnDevice(torch.empty_strided(size, stride, dtype=dtype))

    lib.impl("empty.memory_format", empty, "PrivateUse1")
    lib.impl("empty_strided", empty_strided, "PrivateUse1")
    return lib

_aten = torch.ops.aten
_COPIES = {_aten.copy_.default, _aten._to_copy.default}


class OnDevice(torch.Tensor):
    """A tensor of the second device; its data is `inner`, a host tensor."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "OnDevice":
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            device=DEVICE, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _COPIES:
            leaves, _ = tree_flatten((args, kwargs))
            host = [t for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0]
            if host:
                shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in host)
                raise DeviceMixError(f"{func}: tensors on {DEVICE} and on the CPU ({shapes}) in one operation")
        if func is _aten._to_copy.default and torch.device(kwargs.get("device") or DEVICE).type == "cpu":
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))  # a copy to the host
        if func is _aten._to_copy.default:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is _aten.copy_.default:
            return args[0]  # in place: the destination keeps its device, whichever side the source was on
        return tree_map(_wrap, out)


def _unwrap(value: Any) -> Any:
    return value.inner if isinstance(value, OnDevice) else value


def _wrap(value: Any) -> Any:
    return OnDevice(value) if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice) else value


def _is_second(device: Any) -> bool:
    return device is not None and torch.device(device).type == DEVICE_TYPE


class _SecondDeviceMode(TorchFunctionMode):
    """Makes `OnDevice` tensors where code asks for the second device: `.to(...)`/`.cuda()`-like moves of host
    tensors, and factory functions called with `device=`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and not isinstance(args[0], OnDevice):
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            if _is_second(device):
                source = args[0]
                if source.requires_grad and not source.is_leaf:
                    raise NotImplementedError("moving a tensor inside an autograd graph to the second device")
                moved = source.detach().to(dtype=dtype or source.dtype, copy=bool(kwargs.get("copy", False)))
                return OnDevice(moved).requires_grad_(source.requires_grad)
        if _is_second(kwargs.get("device")):
            return tree_map(_wrap, func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def second_device() -> Iterator[torch.device]:
    """Within the block, the second device can be asked for by name; yields it."""
    # `nn.Module.to` converts a parameter in place (tied weights stay one parameter, as on CUDA) only when
    # it swaps tensors: a device tensor of another class cannot be stored in a host parameter's `.data`.
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _SecondDeviceMode():
            yield DEVICE
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


_FACTORIES = _register_factories()  # kept: the registration lives as long as the library object
