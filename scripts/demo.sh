#!/usr/bin/env bash
# The whole product on the embedded model (SmolLM2-135M-Instruct, HumanEval), on this machine's CPUs:
#   1. screen: the initial student-self-teacher gap of all six privileged contexts, one engine, one student pass;
#   2. sweep: a real Ray Tune sweep training three of them (sweeps/demo.yaml);
#   3. law: `opsd analyze` fits final improvement on initial gap, and the screened contexts get predictions.
# Usage: bash scripts/demo.sh [OUT]      (default OUT: runs/demo; a second run continues where the first stopped)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo}
sweep=${OPSD_DEMO_SWEEP:-sweeps/demo.yaml}   # another sweep file runs the same demo (the tests use a tiny model)
name=$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$sweep")
opsd=.venv/bin/opsd
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
started=$(date +%s)
mkdir -p "$out"

step() { printf '\n\033[1m%s\033[0m\n' "$*"; }

step "1/3  screening six privileged contexts (student sampled once, the self-teacher once per context)"
$opsd screen "$sweep" --out "$out/screen" \
    --contexts none,expert_preamble,feedback,llm_peer_hints,own_solution_feedback,peer_solution_feedback

step "2/3  sweep: training three contexts on Ray Tune ($sweep)"
$opsd sweep run "$sweep" --storage "$out"

step "3/3  the law: improvement against gap, and predictions for the screened contexts"
# A 135M model at T=1 rarely passes all of a problem's tests in 128 tokens: the demo's law is fitted on the
# fraction of tests passed, the other measure every trial reports (the papers' runs use the default).
$opsd analyze "$out/$name" --out "$out/report" --measure tests
$opsd screen "$out/screen/screen.parquet" --law "$out/report/law.json" --measure tests \
    --out "$out/report/predictions.csv" || true

elapsed=$(( $(date +%s) - started ))
step "done in $((elapsed / 60)) min $((elapsed % 60)) s; what is where"
cat <<EOF
  screen      $out/screen/screen.parquet (gap per context, with bootstrap intervals), rollouts beside it
  sweep       $out/$name/trials.parquet (one row per trial), $out/$name/steps.parquet (every step)
              opsd sweep status $out/$name     each trial; logs in $out/$name/trials/*/logs/
  law         $out/report/report.md, law.json, fig1_law.png, fig2_dynamics.png (fig3_scale.png: several sizes)
  W&B         offline runs in $out/$name/wandb/; upload with
              .venv/bin/wandb sync $out/$name/wandb/offline-run-*
  Parquet     readable by pandas (pd.read_parquet), DuckDB (SELECT * FROM '$out/$name/trials.parquet'), Arrow

A demo-sized sweep (one seed, three contexts, one step of 4 rollouts on a 135M model) cannot show the law:
the report says how little its fit means. For a real run: sweeps/paper_fig1.yaml (Qwen3-8B and
Olmo-3-7B-Instruct, six contexts, 3 and 2 seeds, 50 steps on LiveCodeBench v6), installed with
pip install -e ".[gpu]" on B200 nodes, submitted with clusters/ (SLURM, KubeRay, the Ray cluster launcher),
wandb: {mode: online}; \`opsd sweep plan sweeps/paper_fig1.yaml\` estimates its GPU-hours first.
EOF
