#!/usr/bin/env bash
# The first thing to run on a GPU node: checks the GPU code of a trial on one CUDA GPU (H100 or B200) in about
# 10 minutes, from `pip install -e ".[gpu,dev]"` alone (nothing from a model hub, no GGUF file):
#   bash scripts/gpu_check.sh                 with .venv/bin/python, or PYTHON=python bash scripts/gpu_check.sh
# 1. the GPU stack imports (torch with CUDA, vllm, deepspeed, ray, pytest);
# 2. the torch-only part (scripts/gpu_check_torch.py): device placement, a bf16 step, the EMA update, the push's
#    buckets and CUDA IPC, distributed init with its timeouts and a ZeRO-2 step;
# 3. every `gpu`-marked test (the engine's pushes, sleep mode, ZeRO-3 through CUDA IPC) and the device
#    placement test on CUDA with DeepSpeed's real engine (OPSD_PLACEMENT_DEVICE=cuda); none may skip;
# 4. `opsd trial`, 2 steps of a random model with Qwen3's architecture (head_dim 128) in bf16, so vLLM takes its
#    FlashAttention/FlashInfer path: with the default GPU settings (shared-file push, vLLM awake, ZeRO-0, CUDA
#    graphs), with sleep mode, with CUDA IPC, with ZeRO-3; each phase's measured GPU memory beside the estimate
#    of `opsd sweep plan` for the same settings. The default run goes through the per-rank engine path
#    (`rollout.engines: every_rank` at world size 1: the engine on the rank's own GPU through vLLM's
#    `device_ids`, the rank's share of the prompts and of the evaluation, the gathers, records naming the rank).
# It prints each check as it passes and stops with a non-zero exit at the first failure. docs/GPU.md shows the
# expected output. Without a CUDA GPU it says so in one line and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" 2>/dev/null || {
    echo "gpu_check: no CUDA GPU visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not installed')): nothing to check on this machine" >&2
    exit 2
}

WORK=$(mktemp -d -t opsd-gpu-check-XXXXXX)
trap 'status=$?; if [ $status -ne 0 ]; then printf "\nGPU CHECK FAILED (exit %s); logs and results in %s\n" "$status" "$WORK" >&2; fi' EXIT
say() { printf '\n=== %s\n' "$*"; }
started=$SECONDS

say "the GPU stack"
"$PY" - <<'EOF'
import importlib
import sys

missing = []
for name in ("torch", "vllm", "deepspeed", "ray", "pytest", "transformers", "tokenizers"):
    try:
        module = importlib.import_module(name)
        print(f"ok: {name} {getattr(module, '__version__', '')}")
    except Exception as err:  # noqa: BLE001 - each missing piece named, then one verdict
        missing.append(f"{name} ({type(err).__name__}: {err})")
if missing:
    sys.exit("missing: " + "; ".join(missing) + ' -- install with pip install -e ".[gpu,dev]"')
EOF

say "torch-only checks"
"$PY" scripts/gpu_check_torch.py

say "gpu-marked tests and the device placement test on CUDA"
OPSD_PLACEMENT_DEVICE=cuda "$PY" -m pytest -m "gpu or not slow" tests/trainer/test_rollout_gpu.py \
    tests/trainer/test_device_placement.py -p no:cacheprovider -q -rA --junitxml="$WORK/gpu-tests.xml"
# A skipped test checked nothing: on a GPU machine every one of them must run.
"$PY" - "$WORK/gpu-tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
if tests == 0 or skipped:
    sys.exit(f"{tests} tests collected, {skipped} skipped: expected all to run")
print(f"ok: {tests} tests passed on the GPU")
EOF

say "a random Qwen3-architecture model in bf16"
"$PY" -c "from trainer.models import build_tiny_qwen3; print('ok:', build_tiny_qwen3('$WORK/model', seed=0))"
cat > "$WORK/trial.yaml" <<EOF
name: gpu-check
steps: 2
device: cuda
model: {path: $WORK/model, dtype: bfloat16}
data: {source: humaneval, max_problems: 4, max_val_problems: 2}
context: {name: peer_solution_feedback, max_teacher_prompt_tokens: 1024}
rollout: {prompts_per_step: 2, n_samples: 2, max_response_tokens: 64, max_prompt_tokens: 1024,
          gpu_memory_utilization: 0.3}
optim: {lr: 1.0e-3, mini_batch_size: 2, micro_batch_size: 2}
teacher: {ema_rate: 0.5}
deepspeed: {bf16: true}
eval: {every_steps: 2, n_samples: 1, teacher_n_samples: 1}
sandbox: {workers: 2}
EOF

# run_trial NAME [--set FIELD=VALUE ...]: `opsd trial`, then its results: two training steps with a finite
# loss and a weight push each, evaluations before and after, a student whose log-prob of the reference
# solutions moved (the engine holds the trained weights, not the initial or the teacher's), and each phase's
# GPU memory beside the plan's estimate for the same settings.
run_trial() {
    local name=$1
    shift
    say "opsd trial, $name: $*"
    # vLLM's INFO lines include its sleep and wake-up messages, which the sleep-mode run checks.
    VLLM_LOGGING_LEVEL=INFO "$PY" -m orchestrator.cli trial "$WORK/trial.yaml" --out "$WORK/$name" "$@" \
        > "$WORK/$name.log" 2>&1 || { tail -n 60 "$WORK/$name.log" >&2; return 1; }
    "$PY" - "$WORK/$name" <<'EOF'
import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from orchestrator.gpu_memory import PHASES, trial_memory
from trainer.config import TrialConfig

out = Path(sys.argv[1])
rows = pq.read_table(out / "steps.parquet").to_pylist()
train = [r for r in rows if r["phase"] == "train"]
evals = [r for r in rows if r["phase"] == "eval"]
problems = []
if [r["step"] for r in train] != [1, 2]:
    problems.append(f"train steps {[r['step'] for r in train]}, expected [1, 2]")
for r in train:
    if not (math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and r["push_seconds"] > 0):
        problems.append(f"step {r['step']}: loss {r['loss']}, kl {r['kl']}, push_seconds {r['push_seconds']}")
if [r["step"] for r in evals] != [0, 2]:
    problems.append(f"evaluations at steps {[r['step'] for r in evals]}, expected [0, 2]")
else:
    moved = abs(evals[1]["student_ref_logp"] - evals[0]["student_ref_logp"])
    if not moved > 1e-4:
        problems.append(f"student_ref_logp moved by {moved} in two steps: the engine did not get the new weights")
summary = json.loads((out / "trial.json").read_text())
if summary["status"] != "completed":
    problems.append(f"trial.json status {summary['status']}")
if problems:
    sys.exit("; ".join(problems))
print(f"ok: 2 steps, loss {train[-1]['loss']:.4f}, push {train[-1]['push_seconds']:.2f} s, student_ref_logp "
      f"{evals[0]['student_ref_logp']:.4f} -> {evals[1]['student_ref_logp']:.4f}")

# Each phase's GPU memory (GiB): the estimate of `opsd sweep plan` for rank 0, what the whole GPU had in use at
# the phase's end (vLLM included), and the trainer process's peak allocation during it.
cfg = TrialConfig.model_validate(json.loads((out / "config.json").read_text()))
estimate = trial_memory(cfg, gpu_bytes=torch.cuda.mem_get_info()[1]).rank0
measured = {"rollout": ["rollout"], "teacher_forward": ["teacher_forward"],
            "student_forward_backward": ["student_forward_backward"], "push_and_ema": ["weight_push", "ema_update"]}
print(f"   {'phase':<26} {'plan':>8} {'GPU in use':>11} {'trainer peak':>13}")
for phase in PHASES:
    used = max((r.get(f"memory/{p}_used_gib") or 0.0) for r in train for p in measured[phase])
    peak = max((r.get(f"memory/{p}_peak_gib") or 0.0) for r in train for p in measured[phase])
    print(f"   {phase:<26} {estimate[phase] / 2**30:8.2f} {used:11.2f} {peak:13.2f}")
EOF
}

run_trial defaults
if grep -q "Sleep mode freed" "$WORK/defaults.log"; then
    echo "the default run put vLLM to sleep" >&2
    exit 1
fi
# The per-rank engine path at world size 1: the CPU budget printed, every rollout record naming rank 0.
grep -q "^CPU budget: " "$WORK/defaults.log" || { echo "the default run printed no CPU budget" >&2; exit 1; }
"$PY" - "$WORK/defaults" <<'EOF'
import json
import sys
from pathlib import Path

records = [json.loads(line) for path in sorted((Path(sys.argv[1]) / "rollouts").glob("step-*.jsonl"))
           for line in path.read_text().splitlines()]
ranks = {r.get("rank") for r in records}
if not records or ranks != {0}:
    sys.exit(f"{len(records)} rollout records naming ranks {ranks}: expected every one to name rank 0")
print(f"ok: the per-rank engine path at world size 1: {len(records)} rollout records, each sampled by rank 0")
EOF

run_trial sleep-mode --set rollout.sleep_between_phases=true
# vLLM 0.32's own log lines: one sleep per training step, each woken (weights first) by the step's push.
sleeps=$(grep -c "Sleep mode freed" "$WORK/sleep-mode.log" || true)
wakes=$(grep -c "wake up tags \['weights'\]" "$WORK/sleep-mode.log" || true)
if [ "$sleeps" -ne 2 ] || [ "$wakes" -ne 2 ]; then
    echo "expected 2 sleeps and 2 weight wake-ups in the sleep-mode run, vLLM logged $sleeps and $wakes" >&2
    exit 1
fi
echo "ok: vLLM slept $sleeps times and woke its weights $wakes times"

run_trial cuda-ipc --set rollout.weight_sync=cuda_ipc
run_trial zero-3 --set deepspeed.zero_stage=3   # ZeRO-3 partitions the heads: the unfused loss

say "GPU check passed in $((SECONDS - started)) s (logs and results in $WORK)"
