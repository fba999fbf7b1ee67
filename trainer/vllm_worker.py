"""Methods added to every vLLM worker (`worker_extension_cls`), reached through `LLM.collective_rpc`.

vLLM imports this module inside its worker processes; keep it free of heavy imports at module level.
Weights go through `model_runner.reload_weights`, not `model.load_weights`: on the CPU backend the loaded
weights are repacked into kernel layouts, and only the reload path re-runs that processing. Within one
reload call a fused layer (q/k/v, gate/up) is processed once all its parts arrived, so a call must carry
every part of each fused layer it touches (`trainer.weight_push` groups tensors by decoder layer).
"""

from __future__ import annotations

import os


class WeightSyncExtension:
    """Weight updates for the rollout engine; `self` is the vLLM worker (it has `model_runner`)."""

    def opsd_reload_weights_from_file(self, path: str) -> int:
        """Load a safetensors file of checkpoint-named tensors into the running model; returns their count."""
        from safetensors.torch import load_file

        tensors = load_file(path, device="cpu")
        self._opsd_reload(tensors.items())
        return len(tensors)

    def _opsd_reload(self, named_tensors) -> None:
        """`reload_weights`, then refresh modules that share a parameter with a reloaded one (tied lm_head).

        A tied lm_head is never loaded by name (the checkpoint holds only embed_tokens), so the reload does
        not re-process it: the reloaded values land in the shared tensor, but on CPU the lm_head's packed
        GEMM weights were built from the old values at start-up, and logits would keep using them. Every
        alias module is re-tied (should a reload have replaced the shared tensor) and its weight processing
        re-run, which rebuilds the packed weights from the new values (a no-op on GPU).
        """
        model = self.model_runner.get_model()
        if not hasattr(self, "_opsd_ties"):
            self._opsd_ties = _tied_parameters(model)
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))
        for (alias_module, alias_name), (primary_module, primary_name) in self._opsd_ties:
            primary = getattr(model.get_submodule(primary_module), primary_name)
            module = model.get_submodule(alias_module)
            if getattr(module, alias_name) is not primary:
                setattr(module, alias_name, primary)
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)

    def opsd_reload_weights_from_ipc(self, payload: bytes) -> int:
        """Open the trainer's CUDA tensors from IPC handles and load them. GPU only (`rollout.weight_sync:
        cuda_ipc`); see `trainer.weight_push._send_ipc`.

        vLLM's RPC channel carries bytes, so the trainer pickles (its GPU's UUID, [(name, rebuild args of
        `reduce_tensor`)]); both ends are processes of the same trial.
        """
        import pickle

        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        sender_uuid, handles = pickle.loads(payload)  # sent by our own trainer
        device = getattr(self, "device", None)
        device_index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        own_uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        if own_uuid != sender_uuid:
            raise RuntimeError(f"cuda_ipc weight push: this vLLM worker runs on GPU {own_uuid}, the trainer's tensors "
                               f"are on GPU {sender_uuid}; IPC handles open only on the same device (use "
                               "rollout.weight_sync 'shared_file')")
        named = []
        for name, args in handles:
            args = list(args)
            args[6] = device_index  # the handle names the sender's device index; this process may number it otherwise
            named.append((name, rebuild_cuda_tensor(*args)))
        self._opsd_reload(named)
        torch.cuda.synchronize(device_index)  # copied before the trainer may free or overwrite its tensors
        return len(named)

    def opsd_worker_pid(self) -> int:
        """The worker's process id (to check that closing the engine ends it)."""
        return os.getpid()


def _tied_parameters(model) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """((alias module, attribute), (primary module, attribute)) for every parameter reachable twice."""
    first_seen: dict[int, tuple[str, str]] = {}
    ties = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            where = (module_name, param_name)
            if id(param) in first_seen and first_seen[id(param)] != where:
                ties.append((where, first_seen[id(param)]))
            else:
                first_seen.setdefault(id(param), where)
    return ties
