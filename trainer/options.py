"""The choices of the trainer's settings, each a `Literal` defined once, here, and imported by the config
(which validates them) and by the functions that dispatch on them (losses, aggregation, rollout, student,
teacher, distributed). A leaf module: it imports nothing from the project.
"""

from __future__ import annotations

from typing import Literal, get_args

Device = Literal["cpu", "cuda"]
Dtype = Literal["float32", "bfloat16"]
ZeroStage = Literal[0, 1, 2, 3]
# How the trainer's weights reach vLLM: a safetensors file in shared memory (every device; the tested path) or
# CUDA IPC handles of the trainer's GPU tensors (GPU only, same node).
WeightSync = Literal["shared_file", "cuda_ipc"]
# Which trainer ranks own a vLLM engine (and sandbox workers): rank 0 alone, or every rank (its own share of the
# rollouts and of the evaluation).
Engines = Literal["main", "every_rank"]

DataSource = Literal["humaneval", "livecodebench", "jsonl"]
SplitKind = Literal["tests", "problems"]

# The privileged-context constructions of METHOD.md section 2; a user template brings its own name.
BuiltinContext = Literal[
    "none", "expert_preamble", "feedback", "llm_peer_hints", "own_solution_feedback", "peer_solution_feedback"]
CONTEXT_NAMES: tuple[str, ...] = get_args(BuiltinContext)
# Fields a user template may use; every one but `prompt` is privileged and may be truncated.
TemplateField = Literal["prompt", "feedback", "own_solution", "peer_solution", "hint"]
TEMPLATE_FIELDS: tuple[str, ...] = get_args(TemplateField)
Truncation = Literal["left", "right"]

# Divergences between the two next-token distributions; the loss also offers a one-sample estimator.
DistributionDivergence = Literal["reverse_kl", "forward_kl", "jsd"]
Divergence = Literal[DistributionDivergence, "sampled_token"]
Support = Literal["topk_tail", "topk_renorm", "full"]
# How the top-k tail bucket is computed: summed exactly in log space, or as the SDPO reference does (floored).
Tail = Literal["exact", "floored"]
Aggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]

# The sandbox's own choices (sandbox.extract.CodeBlockMode, sandbox.Executor's isolation), named here so that
# the config does not import the sandbox; tests/trainer/test_config.py checks that they agree.
CodeBlock = Literal["longest", "last"]
Isolation = Literal["auto", "full", "none"]
