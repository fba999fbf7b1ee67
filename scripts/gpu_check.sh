#!/usr/bin/env bash
# Checks the GPU code of a trial on one CUDA GPU, in about 5-10 minutes (the first run on a machine also
# compiles DeepSpeed's fused Adam, which needs nvcc). Run it on a GPU node after `pip install -e ".[gpu,dev]"`:
#   bash scripts/gpu_check.sh                 with .venv/bin/python, or PYTHON=python bash scripts/gpu_check.sh
# 1. every `gpu`-marked test (tests/trainer/test_rollout_gpu.py): both weight pushes, sleep mode, ZeRO-3;
# 2. `opsd trial` for 2 steps of a tiny random model with the default GPU settings (shared-file push, no sleep,
#    ZeRO-0, float32), then with every GPU-only branch (cuda_ipc, sleep between phases, ZeRO-3, bf16).
# It prints each check as it passes and stops with a non-zero exit at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d -t opsd-gpu-check-XXXXXX)
trap 'status=$?; if [ $status -ne 0 ]; then printf "\nGPU CHECK FAILED (exit %s); logs and results in %s\n" "$status" "$WORK" >&2; fi' EXIT

say() { printf '\n=== %s\n' "$*"; }
started=$SECONDS

say "torch sees a CUDA GPU"
"$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build {torch.version.cuda})")
free, total = torch.cuda.mem_get_info()
print(f"ok: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, torch {torch.__version__}")
EOF

say "gpu-marked tests"
"$PY" -m pytest -m gpu tests -p no:cacheprovider -q -rA --junitxml="$WORK/gpu-tests.xml"
# A skipped test checked nothing: on a GPU machine every one of them must run.
"$PY" - "$WORK/gpu-tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
if tests == 0 or skipped:
    sys.exit(f"{tests} gpu tests collected, {skipped} skipped: expected all to run")
print(f"ok: {tests} gpu tests passed")
EOF

say "a tiny random model"
"$PY" -c "from trainer.models import build_tiny_model; print('ok:', build_tiny_model('$WORK/model', seed=0))"
cat > "$WORK/trial.yaml" <<EOF
name: gpu-check
steps: 2
device: cuda
model: {path: $WORK/model}
data: {source: humaneval, max_problems: 4, max_val_problems: 2}
context: {name: peer_solution_feedback, max_teacher_prompt_tokens: 1024}
rollout: {prompts_per_step: 2, n_samples: 2, max_response_tokens: 16, max_prompt_tokens: 1024,
          gpu_memory_utilization: 0.3}
optim: {lr: 1.0e-3, mini_batch_size: 2, micro_batch_size: 2}
teacher: {ema_rate: 0.5}
eval: {every_steps: 2, n_samples: 1, teacher_n_samples: 1}
sandbox: {workers: 2}
EOF

# run_trial NAME [--set FIELD=VALUE ...]: `opsd trial`, then its results: two training steps with a finite
# loss and a weight push each, evaluations before and after, and a student whose log-prob of the reference
# solutions moved (the engine holds the trained weights, not the initial or the teacher's).
run_trial() {
    local name=$1
    shift
    say "opsd trial, $name: $*"
    # vLLM's INFO lines include its sleep and wake-up messages, which the opt-in run checks.
    VLLM_LOGGING_LEVEL=INFO "$PY" -m orchestrator.cli trial "$WORK/trial.yaml" --out "$WORK/$name" "$@" \
        > "$WORK/$name.log" 2>&1 || { tail -n 60 "$WORK/$name.log" >&2; return 1; }
    "$PY" - "$WORK/$name" <<'EOF'
import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq

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
EOF
}

run_trial defaults
if grep -q "Sleep mode freed" "$WORK/defaults.log"; then
    echo "the default run put vLLM to sleep" >&2
    exit 1
fi

run_trial opt-in --set rollout.weight_sync=cuda_ipc --set rollout.sleep_between_phases=true \
    --set deepspeed.zero_stage=3 --set deepspeed.bf16=true --set model.dtype=bfloat16
# vLLM 0.32's own log lines: one sleep per training step, each woken (weights first) by the step's push.
sleeps=$(grep -c "Sleep mode freed" "$WORK/opt-in.log" || true)
wakes=$(grep -c "wake up tags \['weights'\]" "$WORK/opt-in.log" || true)
if [ "$sleeps" -ne 2 ] || [ "$wakes" -ne 2 ]; then
    echo "expected 2 sleeps and 2 weight wake-ups in the opt-in run, vLLM logged $sleeps and $wakes" >&2
    exit 1
fi
echo "ok: vLLM slept $sleeps times and woke its weights $wakes times"

say "GPU check passed in $((SECONDS - started)) s (logs and results in $WORK)"
