"""The rollout engine: vLLM sampling from the student, log-prob scoring, and weight pushes from the trainer.

One class for CPU and GPU, and by default one code path: weights travel as safetensors files in shared memory
(trainer/weight_push.py), which the CPU tests exercise. What differs on a GPU is small and named: the KV cache
is a share of the GPU (`gpu_memory_utilization`) instead of `VLLM_CPU_KVCACHE_SPACE`, and two opt-in settings
exist only there: `weight_sync="cuda_ipc"` (CUDA tensors travel as IPC handles) and `sleep_mode` (`sleep`
frees the engine's GPU memory for the training phase; the next `push_weights` wakes it).

vLLM starts engine processes with the "spawn" method: a script that creates a `RolloutEngine` at import
time needs an `if __name__ == "__main__":` guard. Tests create engines inside fixtures, which is fine.

Log-probs. The engine runs with `logprobs_mode="processed_logprobs"`: `Rollout.logps` are the sampled
tokens' log-probs under the distribution they were sampled from, i.e. log_softmax(logits / T) after
top-p truncation and renormalisation. That is the behaviour policy the loss's importance correction
needs: the trainer computes log_softmax(logits / T) of the same tokens (METHOD.md section 1: both sides
divide by the rollout temperature), so with top_p = 1 the two agree up to numerics, and the ratio
exp(trainer - rollout) measures only the trainer/engine mismatch. With top_p < 1 the rollout log-probs
are those of the truncated distribution (larger than the untruncated ones), which is the honest sampling
probability. `logprobs_of` scores given tokens through `prompt_logprobs`, which vLLM never
temperature-scales: it returns log_softmax(logits) at T = 1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import torch

from trainer.errors import RolloutError
from trainer.options import Device, Dtype, WeightSync
from trainer.rank_shares import core_list
from trainer.weight_push import push_buckets

WORKER_EXTENSION = "trainer.vllm_worker.WeightSyncExtension"


@dataclass
class Rollout:
    """One sampled response. `logps[i]` is the log-prob of `token_ids[i]` under the sampling distribution."""

    token_ids: list[int]
    logps: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


class RolloutEngine:
    """vLLM `LLM` holding the student's weights, with batched sampling, scoring and weight pushes."""

    def __init__(self, model_path: str | Path, *, dtype: Dtype = "float32", seed: int = 0,
                 max_model_len: int = 4096, device: Device = "cpu", kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.45, enforce_eager: bool | None = None,
                 push_bucket_gib: float = 1.0, weight_sync: WeightSync = "shared_file",
                 sleep_mode: bool = False, device_index: int | None = None,
                 cpu_cores: Sequence[int] | None = None) -> None:
        """Start the engine (tens of seconds on CPU).

        kv_cache_gib: KV cache on CPU; vLLM's CPU backend reads it as whole GiB (`VLLM_CPU_KVCACHE_SPACE`,
            set here for the engine processes), so it is rounded up. Ignored on GPU.
        gpu_memory_utilization: vLLM's share of the GPU when colocated with the trainer. Ignored on CPU.
        enforce_eager: skip CUDA graphs / torch.compile. None: eager on CPU (vLLM's CPU backend gains nothing
            from them, and start-up stays short), CUDA graphs on GPU (decoding is several times faster; the
            capture costs start-up time once).
        push_bucket_gib: weights per reload call in `push_weights` (decoder layers are never split); the host
            memory a 'shared_file' push costs.
        weight_sync: 'shared_file' (any device) or 'cuda_ipc' (GPU only; host tensors still go by file).
        sleep_mode: let `sleep` free the engine's GPU memory between phases (GPU only).
        device_index: on GPU, which of this process's visible GPUs the engine's worker uses (vLLM's
            `device_ids`; an "mp" engine's worker is otherwise local rank 0 of its own world, i.e. the first
            visible GPU, whichever trainer rank started it). None: the first.
        cpu_cores: on CPU, the cores the engine's worker threads are bound to (`VLLM_CPU_OMP_THREADS_BIND`);
            None: vLLM's automatic binding (the first NUMA node of this process's CPUs, minus a reserved core).
        max_model_len is capped at the model's own `max_position_embeddings` (vLLM refuses a longer one).
        """
        from vllm import LLM

        if device not in ("cpu", "cuda"):
            raise RolloutError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if weight_sync not in ("shared_file", "cuda_ipc"):
            raise RolloutError(f"weight_sync must be 'shared_file' or 'cuda_ipc', not {weight_sync!r}")
        if device == "cpu" and (weight_sync == "cuda_ipc" or sleep_mode):
            raise RolloutError("weight_sync 'cuda_ipc' and sleep_mode need device 'cuda'")
        self.device = device
        self.weight_sync = weight_sync
        self.sleep_mode = sleep_mode
        self._asleep = False
        self.dtype = dtype
        self.model_path = Path(model_path)
        model_limit = json.loads((self.model_path / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(max_model_len, model_limit or max_model_len)
        self.max_model_len = max_model_len
        self._push_bucket_bytes = int(push_bucket_gib * 2**30)
        kwargs = {}
        if enforce_eager is None:
            enforce_eager = device == "cpu"
        # On CUDA vLLM forks its engine and worker processes unless told otherwise; this process already runs
        # threads (the sandbox's, Ray's, torch's), and a fork copies their locks in whatever state they are.
        # The CPU platform always spawns, so spawn is also the start method the CPU tests run.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
            # vLLM 0.32's CPU runner crashes ('CPU Generator does not use offset') when a seeded request's
            # prompt is prefilled in chunks; whole prefills avoid the code path and keep seeds exact.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        elif device == "cuda":
            # Sleep mode puts the engine's memory under vLLM's own allocator; only asked for when it is used.
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode)
            if device_index is not None:
                kwargs.update(device_ids=[device_index])
        children_before = {p.pid for p in psutil.Process().children(recursive=True)}
        started = time.perf_counter()
        # The engine's processes read the binding when they start; later engines of this process get their own.
        bind = {"VLLM_CPU_OMP_THREADS_BIND": core_list(cpu_cores)} if device == "cpu" and cpu_cores else {}
        with _environment(bind):
            self.llm = LLM(
                model=str(self.model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                enforce_eager=enforce_eager, worker_extension_cls=WORKER_EXTENSION,
                # Inside a Ray Tune trial vLLM would otherwise pick its Ray backend (a placement group is current)
                # and refuse a bundle of several GPUs (vllm#3190); the engine's workers are the trial's own
                # processes.
                distributed_executor_backend="mp", logprobs_mode="processed_logprobs", **kwargs)
        self.startup_seconds = time.perf_counter() - started
        # The engine's own processes (engine core, workers), so close() can wait for them; multiprocessing's
        # resource tracker is shared by the whole interpreter and outlives any one engine.
        self._engine_processes = [
            p for p in psutil.Process().children(recursive=True)
            if p.pid not in children_before and not _is_resource_tracker(p)]
        self.tokenizer = self.llm.get_tokenizer()
        self._closed = False

    # -- sampling ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int, seed: int | None = None) -> list[list[Rollout]]:
        """n samples for each prompt (token ids), in one batched engine call; result[i][j] is prompt i's j-th.

        With `seed`, sample j of prompt i uses seed + i * n + j: the same call gives the same rollouts, and a
        share of a larger call's prompts, from its prompt `first` on, draws what that call would draw when given
        seed + first * n (each seed is per request, so the rest of the batch does not change the draw).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake()
        if n < 1 or max_tokens < 1:
            raise RolloutError(f"generate needs n >= 1 and max_tokens >= 1 (got n={n}, max_tokens={max_tokens})")
        if not prompts:
            return []
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(SamplingParams(
                    n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                    seed=None if seed is None else seed + i * n + j))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rollouts = [self._to_rollout(out.outputs[0]) for out in outputs]
        return [rollouts[i * n:(i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _to_rollout(completion) -> Rollout:
        if completion.finish_reason not in ("stop", "length"):
            raise RolloutError(f"vLLM finished a rollout with reason {completion.finish_reason!r}")
        token_ids = list(completion.token_ids)
        logps = [entry[tok].logprob for tok, entry in zip(token_ids, completion.logprobs)]
        return Rollout(token_ids=token_ids, logps=logps, text=completion.text,
                       finish_reason=completion.finish_reason)

    # -- scoring ----------------------------------------------------------------------------------------
    def score(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Log-probs at T = 1 of each completion's tokens given its prompt, for a batch of (prompt, completion)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake()
        for prompt, completion in sequences:
            if not prompt or not completion:
                raise RolloutError("score needs a non-empty prompt and completion")
        requests = [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in sequences]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for (prompt, completion), out in zip(sequences, outputs):
            tokens = list(prompt) + list(completion)
            entries = out.prompt_logprobs[len(prompt):]
            result.append([entry[tok].logprob for tok, entry in zip(tokens[len(prompt):], entries)])
        return result

    def logprobs_of(self, prompt: list[int], completion: list[int]) -> list[float]:
        """Log-probs at T = 1 of `completion`'s tokens after `prompt` (one per completion token)."""
        return self.score([(prompt, completion)])[0]

    # -- weights ----------------------------------------------------------------------------------------
    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Replace the engine's weights with checkpoint-named tensors (e.g. the trainer's `named_parameters()`).

        Tensors may be a subset of the model (untouched layers keep their weights) but must hold every part of
        each decoder layer they touch; they may live on any device. Prefix-cached KV entries are dropped after
        the push. A sleeping engine is woken: its weights first, so that the KV cache's memory is taken back
        only once the push's transient copies are gone. Returns metrics.
        """
        self._check_open()
        started = time.perf_counter()
        asleep = self._asleep
        if asleep:
            _return_cached_gpu_memory()
            self.llm.wake_up(tags=["weights"])
        metrics = push_buckets(self.llm.collective_rpc, named_tensors, weight_sync=self.weight_sync,
                               dtype=self._engine_dtype(), bucket_bytes=self._push_bucket_bytes)
        if asleep:
            _return_cached_gpu_memory()  # the push's transient bucket copies
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()
        return {"push/seconds": time.perf_counter() - started, **metrics}

    def _engine_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def process_ids(self) -> list[int]:
        """Process ids of every process the engine started (engine core and workers)."""
        return [p.pid for p in self._engine_processes]

    def worker_pids(self) -> list[int]:
        """Process ids of the engine's model workers."""
        self._check_open()
        return list(self.llm.collective_rpc("opsd_worker_pid"))

    # -- memory phases ----------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the engine's GPU memory for the training phase (weights offloaded to the host, KV cache dropped).

        Only with `sleep_mode` (GPU); otherwise a no-op. Level 1 keeps a host copy of the weights, so waking
        restores a working engine even when a push covers only some layers. Until the next `push_weights` or
        `wake_up`, sampling and scoring raise RolloutError.
        """
        self._check_open()
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Restore a sleeping engine (weights and KV cache); a no-op when it is awake."""
        self._check_open()
        if self._asleep:
            _return_cached_gpu_memory()
            self.llm.wake_up()
            self._asleep = False

    @property
    def asleep(self) -> bool:
        return self._asleep

    def close(self, timeout: float = 30.0) -> None:
        """Shut down the engine's processes and wait until they have ended (killed after `timeout` s).

        Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm, self.tokenizer
        gc.collect()
        _, alive = psutil.wait_procs(self._engine_processes, timeout=timeout)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=5)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RolloutError("the rollout engine was closed")

    def _check_awake(self) -> None:
        self._check_open()
        if self._asleep:
            raise RolloutError("the rollout engine is asleep: push weights or call wake_up() before using it")

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` in os.environ for the duration, the previous values (or their absence) restored after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except psutil.Error:
        return False


def _return_cached_gpu_memory() -> None:
    """Hand the memory PyTorch's caching allocator keeps (the training phase's activations and gradients)
    back to the driver before vLLM wakes: vLLM's CuMem allocator asks the driver, not PyTorch's cache, and
    without this `wake_up` runs out of memory on a GPU the trainer just used (verl#575, verl#6912)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
