"""How the trainer's weights travel into the vLLM engine: buckets of checkpoint-named tensors, two transports.

- 'shared_file' (the default on every device): a bucket is copied to the host (one bucket at a time: the only
  host memory a push costs, whatever the model's size), written as a safetensors file in /dev/shm, and every
  vLLM worker loads it (`WeightSyncExtension.opsd_reload_weights_from_file`). The CPU tests run exactly this
  code; on a GPU only the device-to-host copy in `host_copies` does something different.
- 'cuda_ipc' (opt-in, GPU only): a bucket of CUDA tensors travels as CUDA IPC handles, so the worker copies
  device to device and the host sees nothing (`_send_ipc`). IPC handles exist only for device memory: a bucket
  holding any host tensor (an offloaded teacher's, say) goes by file instead (`bucket_transport`).

Both end in the worker's `reload_weights`, which needs every part of a fused layer (q/k/v, gate/up) within one
call: `group_for_reload` never splits a decoder layer between buckets.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Literal

import torch

from trainer.errors import RolloutError
from trainer.options import WeightSync

Transport = Literal["file", "ipc"]
Bucket = list[tuple[str, torch.Tensor]]
# `LLM.collective_rpc`: (worker method name, args=...) -> one result per worker.
Rpc = Callable[..., list]

_LAYER_RE = re.compile(r"^(.*?\blayers\.\d+)\.")


def group_for_reload(named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int) -> Iterable[Bucket]:
    """Split checkpoint-named tensors into reload calls of about `bucket_bytes`, never splitting a decoder layer.

    vLLM processes a fused layer (q/k/v, gate/up) once all its parts arrived within one reload call, so every
    tensor of `...layers.N.` stays in the same bucket. Input order is kept (trainer state dicts are layer-major).
    Lazy: a ZeRO-3 gather upstream produces the next tensors only when the previous bucket has been sent.
    """
    bucket: Bucket = []
    size = 0
    current_group = None
    for name, tensor in named_tensors:
        match = _LAYER_RE.match(name)
        group = match.group(1) if match else name
        if bucket and group != current_group and size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        current_group = group
    if bucket:
        yield bucket


def bucket_transport(bucket: Bucket, weight_sync: WeightSync) -> Transport:
    """How one bucket travels: by file, or (with 'cuda_ipc') as IPC handles when every tensor is on one GPU."""
    if weight_sync == "shared_file":
        return "file"
    elif weight_sync == "cuda_ipc":
        devices = {tensor.device for _, tensor in bucket}
        return "ipc" if len(devices) == 1 and devices.pop().type == "cuda" else "file"
    else:
        raise RolloutError(f"unknown weight_sync {weight_sync!r}")


def host_copies(bucket: Bucket, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The bucket's tensors on the host in the engine's dtype, one distinct tensor per name.

    A host tensor already in that dtype is not copied, except that safetensors refuses two names on one
    memory (a state dict's tied lm_head.weight beside embed_tokens.weight): the second name gets a clone.
    """
    tensors, seen = {}, set()
    for name, tensor in bucket:
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return tensors


def push_buckets(rpc: Rpc, named_tensors: Iterable[tuple[str, torch.Tensor]], *, weight_sync: WeightSync,
                 dtype: torch.dtype, bucket_bytes: int) -> dict[str, float]:
    """Send every bucket to the workers through `rpc`; returns counts (tensors, GiB, buckets per transport).

    Raises RolloutError when a worker loaded fewer tensors than it was sent.
    """
    n_tensors = n_bytes = 0
    buckets = {"file": 0, "ipc": 0}
    for bucket in group_for_reload(named_tensors, bucket_bytes=bucket_bytes):
        transport = bucket_transport(bucket, weight_sync)
        if transport == "file":
            sent, loaded = _send_file(rpc, host_copies(bucket, dtype))
        elif transport == "ipc":
            sent, loaded = _send_ipc(rpc, bucket, dtype)
        else:
            raise RolloutError(f"unknown transport {transport!r}")
        if any(count != len(bucket) for count in loaded):
            raise RolloutError(f"weight push: workers loaded {loaded} of {len(bucket)} tensors")
        buckets[transport] += 1
        n_tensors += len(bucket)
        n_bytes += sent
    return {"push/tensors": float(n_tensors), "push/gib": n_bytes / 2**30,
            "push/file_buckets": float(buckets["file"]), "push/ipc_buckets": float(buckets["ipc"])}


def _send_file(rpc: Rpc, tensors: dict[str, torch.Tensor]) -> tuple[int, list]:
    """One safetensors file in /dev/shm (memory, not disk), loaded by every worker, removed afterwards."""
    from safetensors.torch import save_file

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="opsd-weights-", suffix=".safetensors", dir=shm)
    os.close(fd)
    try:
        save_file(tensors, path)
        loaded = rpc("opsd_reload_weights_from_file", args=(path,))
    finally:
        os.unlink(path)
    return sum(t.numel() * t.element_size() for t in tensors.values()), loaded


def _send_ipc(rpc: Rpc, bucket: Bucket, dtype: torch.dtype) -> tuple[int, list]:
    """GPU only (`rollout.weight_sync: cuda_ipc`; tests/trainer/test_rollout_gpu.py): CUDA IPC handles.

    The workers open the handles on their own GPU, which must be the sender's (same node, same physical
    device: checked by UUID on the worker's side), and copy the weights in `reload_weights`. Tensors are cast
    to the engine's dtype first (a transient copy on the GPU when the trainer's dtype differs).
    """
    import pickle

    from torch.multiprocessing.reductions import reduce_tensor

    device = bucket[0][1].device
    # Strong references until the workers have copied: an IPC handle does not keep its memory alive.
    tensors = [(name, tensor.detach().to(dtype).contiguous()) for name, tensor in bucket]
    torch.cuda.synchronize(device)  # the casts have finished before another process reads the memory
    sender_uuid = str(torch.cuda.get_device_properties(device).uuid)
    # Only the rebuild arguments travel (vLLM's RPC carries bytes; both ends are processes of one trial).
    payload = pickle.dumps((sender_uuid, [(name, reduce_tensor(tensor)[1]) for name, tensor in tensors]))
    loaded = rpc("opsd_reload_weights_from_ipc", args=(payload,))
    n_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
    del tensors
    torch.cuda.ipc_collect()  # release the memory the workers no longer map
    return n_bytes, loaded
